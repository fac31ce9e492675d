// A gRPC server and client on grpc-go, for the integration tests of HTTP/2 and gRPC
// capture (tests/integration/test_http2_capture.py). Built by scripts/bootstrap.sh
// --test-peers into its cache; no generated code: the messages are raw bytes through a
// codec registered under the name "proto" (what grpc-go uses by default), and the
// service is described by hand. Same service as tests/integration/grpc_greeter.py:
//
//	greeter serve PORT        helloworld.Greeter/SayHello: "hello " + request
//	greeter call PORT N       N unary SayHello calls on one connection, then exit
//	greeter h2c PORT          plain HTTP (golang.org/x/net/http2/h2c): HTTP/1.1, prior-
//	                          knowledge HTTP/2 and `Upgrade: h2c`; GET / -> "hello h2c"
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
)

// rawCodec passes message bytes through unchanged (*[]byte both ways).
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func sayHello(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	out := append([]byte("hello "), in...)
	return &out, nil
}

var greeter = grpc.ServiceDesc{
	ServiceName: "helloworld.Greeter",
	HandlerType: (*any)(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "SayHello", Handler: sayHello}},
}

func main() {
	encoding.RegisterCodec(rawCodec{})
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: greeter serve PORT | greeter call PORT N | greeter h2c PORT")
		os.Exit(2)
	}
	addr := "127.0.0.1:" + os.Args[2]
	switch os.Args[1] {
	case "serve":
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		s := grpc.NewServer()
		s.RegisterService(&greeter, struct{}{})
		if err := s.Serve(lis); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "h2c":
		hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "9")
			w.Write([]byte("hello h2c"))
		})
		srv := &http.Server{Addr: addr, Handler: h2c.NewHandler(hello, &http2.Server{})}
		if err := srv.ListenAndServe(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "call":
		n, _ := strconv.Atoi(os.Args[3])
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer conn.Close()
		for i := 0; i < n; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			in, out := []byte(fmt.Sprintf("world %d", i)), []byte(nil)
			err := conn.Invoke(ctx, "/helloworld.Greeter/SayHello", &in, &out)
			cancel()
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			fmt.Println(string(out))
		}
	}
}
