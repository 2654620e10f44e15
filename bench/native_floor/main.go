// The native floor of bench/gateway: what forwarding costs with nothing else, in Go.
//
//   - gRPC: a plain grpc-go proxy that forwards every call (any method, unary or
//     streaming) to one backend as bytes (a pass-through codec), with the client's
//     metadata; no routing, keys, logging or metrics.
//   - HTTP: a plain net/http/httputil.ReverseProxy to one backend.
//
// It prints {"grpc": PORT, "http": PORT} on stdout once both listen, and runs until
// its stdin closes (the benchmark holds the pipe).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
)

// raw is a codec that leaves messages as bytes.
type raw struct{}

func (raw) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (raw) Name() string { return "proto" } // stands in for the proto codec

var both = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

func main() {
	grpcListen := flag.String("grpc-listen", "127.0.0.1:0", "gRPC address")
	grpcBackend := flag.String("grpc-backend", "", "backend gRPC host:port")
	httpListen := flag.String("http-listen", "127.0.0.1:0", "HTTP address")
	httpBackend := flag.String("http-backend", "", "backend HTTP host:port")
	maxBytes := flag.Int("max-bytes", 64<<20, "largest message")
	flag.Parse()
	encoding.RegisterCodec(raw{})

	conn, err := grpc.NewClient(*grpcBackend, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{}), grpc.MaxCallRecvMsgSize(*maxBytes), grpc.MaxCallSendMsgSize(*maxBytes)))
	if err != nil {
		panic(err)
	}
	forward := func(_ any, stream grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(stream)
		md, _ := metadata.FromIncomingContext(stream.Context())
		ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(stream.Context(), md))
		defer cancel()
		cs, err := conn.NewStream(ctx, both, method)
		if err != nil {
			return err
		}
		go func() {
			for {
				var m []byte
				if err := stream.RecvMsg(&m); err != nil {
					_ = cs.CloseSend()
					return
				}
				if cs.SendMsg(&m) != nil {
					return
				}
			}
		}()
		for {
			var m []byte
			if err := cs.RecvMsg(&m); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
			if err := stream.SendMsg(&m); err != nil {
				return err
			}
		}
	}
	srv := grpc.NewServer(grpc.UnknownServiceHandler(forward), grpc.ForceServerCodec(raw{}),
		grpc.MaxRecvMsgSize(*maxBytes), grpc.MaxSendMsgSize(*maxBytes))
	gl, err := net.Listen("tcp", *grpcListen)
	if err != nil {
		panic(err)
	}
	go func() { _ = srv.Serve(gl) }()

	target, err := url.Parse("http://" + *httpBackend)
	if err != nil {
		panic(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{MaxIdleConnsPerHost: 256}
	hl, err := net.Listen("tcp", *httpListen)
	if err != nil {
		panic(err)
	}
	go func() { _ = http.Serve(hl, proxy) }()

	ports := map[string]int{"grpc": gl.Addr().(*net.TCPAddr).Port, "http": hl.Addr().(*net.TCPAddr).Port}
	if err := json.NewEncoder(os.Stdout).Encode(ports); err != nil {
		panic(err)
	}
	_, _ = io.Copy(io.Discard, os.Stdin) // until the benchmark closes the pipe
	srv.Stop()
}
