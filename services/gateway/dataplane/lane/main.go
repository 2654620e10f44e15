// Command gwlane is the gateway's native data plane: the public gRPC port of the gateway.
//
// It serves ModelInfer requests on the common path itself -- an allowed API key, routing
// fields that scan cleanly, a model whose route has a serving version and no shadow, a ready
// Triton server that answers OK -- forwarding the request's bytes to Triton (with the version
// it picked and an id appended) and Triton's bytes back. Everything else goes, as bytes with
// the client's metadata and deadline, to the Python gateway (the backend) on a unix socket:
// other methods and services (metadata, ModelAdmin, health), and every ModelInfer the lane
// does not serve itself (a wrong key, malformed framing, an unknown model or version, shadow
// mode, no ready server, and any error from Triton, with the version the lane picked in the
// x-cdl-lane-version metadata, so that canary accounting, the retry on the stable version and
// the client-fault checks stay the Python gateway's: an UNAVAILABLE or NOT_FOUND is sent
// again by it (to another server); any other error comes with its code, details and latency
// in x-cdl-lane-code, x-cdl-lane-details-bin and x-cdl-lane-latency-us, and is not sent again). The Python gateway is the only one that
// writes error messages.
//
// The Python gateway that starts the lane drives it over two pipes. On stdin, JSON lines:
// {"routes": {"model": [stable, candidate, canary, shadow]}} and {"ready": ["host:port"]}.
// On stdout, binary frames (little-endian), each u32 length then the body:
//
//	0  ready:  u8 0, u32 port, u32 REST port (0: none)
//	1  served: u8 1, u8 code, u32 version, f64 latency_s, f64 unix time,
//	           u32 len model, u32 len id, u32 len request, u32 len response, then those bytes
//	           (request and response empty when the request was not sampled for the log, or
//	           when more than frameBudget bytes of reports wait: log_dropped counts those)
//	2  stats:  u8 2, then JSON {"outstanding": {"host:port": n}, "dropped": n, "delegated": n,
//	           "log_dropped": n}
//	3  ack:    u8 3, u32 seq -- the control line with that "seq" is applied
//	4  served over REST: as 1 (the bodies as sent to and answered by Triton), then after the
//	           four lengths u32 request JSON length, u32 response JSON length (0: all JSON)
//
// With --http-listen it also serves the REST/HTTP v2 port (rest.go): infer on the common path
// natively to Triton's HTTP port (--triton-http), everything else to the Python gateway's REST
// server (--http-backend).
//
// stdin's end (the gateway exited, even killed -9) stops the lane.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/gzip" // clients may compress (grpc-go has no deflate)
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	inferMethod       = "/inference.GRPCInferenceService/ModelInfer"
	streamInferMethod = "/inference.GRPCInferenceService/ModelStreamInfer"
	hintKey           = "x-cdl-lane-version"
	codeKey           = "x-cdl-lane-code"
	detailsKey        = "x-cdl-lane-details-bin"
	latencyKey        = "x-cdl-lane-latency-us"
	frameBudget       = 32 << 20 // bytes of reports waiting at most; past it, reports go without payload
	appendSlack       = 4096
	flushDelay        = 200 * time.Millisecond // a report waits at most this long for others to go with it
	flushBytes        = 64 << 10               // ... or until this much is buffered
	keyCacheMax       = 256
	budgetsMax        = 65536
)

// rawCodec passes messages through as bytes (the lane never parses a message it forwards).
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("gwlane: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("gwlane: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

type route struct {
	stable, candidate int
	canary, shadow    float64
	stableS, candS    string
}

type backend struct {
	endpoint    string
	http        string       // its HTTP port (host:port); empty: the lane serves REST through the Python gateway
	httpDown    atomic.Int64 // unix ns until which its HTTP port is not used (it refused a connection)
	conn        *grpc.ClientConn
	outstanding atomic.Int32
}

type lane struct {
	backend       *grpc.ClientConn
	servers       map[string]*backend
	ready         atomic.Pointer[[]*backend]
	routes        atomic.Pointer[map[string]route]
	auth          atomic.Pointer[keySet] // the inference keys; replaced whole when they rotate
	timeout       time.Duration
	idPrefix      string
	ids           atomic.Uint64
	tick          atomic.Uint64
	rr            atomic.Uint32
	sample        float64
	credit        atomic.Uint64 // sampled requests so far x 2**20 / sample, see sampled
	frames        chan []byte
	dropped       atomic.Uint64
	delegated     atomic.Uint64
	versionFields sync.Map // int -> []byte
	inflight      atomic.Int64
	queued        atomic.Int64 // bytes of frames waiting or unflushed
	logDropped    atomic.Uint64
	acked         atomic.Uint32
	maxBytes      int
	budget        *budget                // each key's request budget; nil: none
	httpServers   bool                   // every Triton server's HTTP port is known: REST infer is served here
	rest          *httputil.ReverseProxy // the Python gateway's REST server
	tritonHTTP    *http.Client
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "public address")
	backendSock := flag.String("backend", "", "the Python gateway's unix socket")
	tritons := flag.String("triton", "", "Triton gRPC endpoints, comma-separated")
	keyHashes := flag.String("key-hashes", "", "SHA-256 hex digests of the inference API keys, comma-separated")
	timeoutS := flag.Float64("timeout", 10, "deadline given to a request that came without one, seconds")
	maxBytes := flag.Int("max-bytes", 16<<20, "largest message accepted")
	certFile := flag.String("tls-cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("tls-key", "", "TLS key (PEM)")
	sample := flag.Float64("log-sample", 1, "share of served requests sent up for the inference log")
	idPrefix := flag.String("id-prefix", "gw-lane-", "prefix of generated request ids")
	httpListen := flag.String("http-listen", "", "public REST/HTTP v2 address; empty: none")
	httpBackend := flag.String("http-backend", "", "the Python gateway's REST server's unix socket")
	tritonHTTP := flag.String("triton-http", "", "Triton HTTP endpoints, comma-separated, in --triton's order")
	keyRate := flag.Float64("key-rate", 0, "each API key's request budget, requests a second; 0: none")
	keyBurst := flag.Int("key-burst", 0, "requests a key may send at once above its rate; 0: the rate, rounded up")
	scanOnly := flag.Bool("scan", false, "test hook: scan length-prefixed requests from stdin, write what was read")
	flag.Parse()
	if *scanOnly {
		if err := scanStream(os.Stdin, os.Stdout); err != nil {
			fatal("scan", err)
		}
		return
	}
	slog.SetDefault(slog.New(slog.NewJSONHandler(os.Stderr, nil)))
	encoding.RegisterCodec(rawCodec{})

	l := &lane{
		servers:  map[string]*backend{},
		timeout:  time.Duration(*timeoutS * float64(time.Second)),
		idPrefix: *idPrefix,
		sample:   math.Min(math.Max(*sample, 0), 1),
		frames:   make(chan []byte, 16384),
		maxBytes: *maxBytes,
		budget:   newBudget(*keyRate, *keyBurst),
	}
	l.setKeys(strings.Split(*keyHashes, ","))
	empty := map[string]route{}
	l.routes.Store(&empty)
	none := []*backend{}
	l.ready.Store(&none)

	clientOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(*maxBytes),
			grpc.MaxCallSendMsgSize(*maxBytes+appendSlack),
		),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.WithDisableRetry(),
	}
	var err error
	l.backend, err = grpc.NewClient("unix://"+*backendSock, clientOpts...)
	if err != nil {
		fatal("backend channel", err)
	}
	grpcEPs, httpEPs := splitList(*tritons), splitList(*tritonHTTP)
	l.httpServers = len(httpEPs) > 0 && len(httpEPs) == len(grpcEPs)
	for i, ep := range grpcEPs {
		conn, err := grpc.NewClient(ep, clientOpts...)
		if err != nil {
			fatal("triton channel", err)
		}
		conn.Connect()
		b := &backend{endpoint: ep, conn: conn}
		if l.httpServers {
			b.http = httpEPs[i]
		}
		l.servers[ep] = b
	}

	serverOpts := []grpc.ServerOption{
		grpc.UnknownServiceHandler(l.handle),
		grpc.MaxRecvMsgSize(*maxBytes),
		grpc.MaxSendMsgSize(*maxBytes),
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fatal("TLS key pair", err)
		}
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewServerTLSFromCert(&cert)))
	}
	lis, err := bind(*listen)
	if err != nil {
		fatal("listen", err)
	}
	srv := grpc.NewServer(serverOpts...)
	port := lis.Addr().(*net.TCPAddr).Port
	var httpSrv *http.Server
	httpPort := 0
	if *httpListen != "" {
		hlis, err := bind(*httpListen)
		if err != nil {
			fatal("listen (HTTP)", err)
		}
		httpPort = hlis.Addr().(*net.TCPAddr).Port
		l.rest = restBackend(*httpBackend)
		l.tritonHTTP = &http.Client{Transport: tritonTransport()}
		httpSrv = &http.Server{
			Handler:           http.HandlerFunc(l.serveHTTP),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       120 * time.Second,
			ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
		}
		go func() {
			var err error
			if *certFile != "" {
				err = httpSrv.ServeTLS(hlis, *certFile, *keyFile)
			} else {
				err = httpSrv.Serve(hlis)
			}
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				fatal("serve (HTTP)", err)
			}
		}()
	}

	out := bufio.NewWriterSize(os.Stdout, 256<<10)
	ready := make([]byte, 13)
	binary.LittleEndian.PutUint32(ready, 9)
	ready[4] = 0
	binary.LittleEndian.PutUint32(ready[5:], uint32(port))
	binary.LittleEndian.PutUint32(ready[9:], uint32(httpPort))
	l.frames <- ready
	go l.writeFrames(out)
	go l.stats()
	go func() {
		l.readControl(os.Stdin)
		// the gateway is gone: stop taking requests, finish those in flight (5 s at most), exit.
		// GracefulStop also waits for idle client connections to go, which clients may keep
		// open: once nothing is in flight, Stop closes them.
		go srv.GracefulStop()
		if httpSrv != nil {
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = httpSrv.Shutdown(ctx)
			}()
		}
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			if l.inflight.Load() == 0 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		srv.Stop()
		if httpSrv != nil {
			_ = httpSrv.Close()
		}
		l.drain(2 * time.Second) // the last requests' reports reach the gateway
		os.Exit(0)
	}()
	slog.Info("gateway lane serving", "port", port, "http_port", httpPort, "triton", *tritons, "triton_http", *tritonHTTP)
	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		fatal("serve", err)
	}
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

func fatal(what string, err error) {
	slog.Error("gateway lane failed", "step", what, "error", err.Error())
	os.Exit(1)
}

// bind listens on addr, retrying for a few seconds while the port is still held (a lane of a
// gateway that was just killed exits when its stdin closes, a moment later).
func bind(addr string) (net.Listener, error) {
	lc := net.ListenConfig{}
	deadline := time.Now().Add(10 * time.Second)
	for {
		lis, err := lc.Listen(context.Background(), "tcp", addr)
		if err == nil || time.Now().After(deadline) || !errors.Is(err, syscall.EADDRINUSE) {
			return lis, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ------------------------------------------------------------------ control (stdin)

type control struct {
	Routes map[string][4]float64 `json:"routes"`
	Ready  *[]string             `json:"ready"`
	Keys   *[]string             `json:"keys"` // the inference keys' digests, rotated
	Seq    uint32                `json:"seq"`
}

func (l *lane) readControl(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 64<<20)
	for sc.Scan() {
		var c control
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			slog.Warn("gateway lane: control line ignored", "error", err.Error())
			continue
		}
		if c.Routes != nil {
			routes := make(map[string]route, len(c.Routes))
			for name, r := range c.Routes {
				rt := route{stable: int(r[0]), candidate: int(r[1]), canary: r[2], shadow: r[3]}
				rt.stableS, rt.candS = canonicalVersion(rt.stable), canonicalVersion(rt.candidate)
				routes[name] = rt
			}
			l.routes.Store(&routes)
		}
		if c.Ready != nil {
			ready := make([]*backend, 0, len(*c.Ready))
			for _, ep := range *c.Ready {
				if b, ok := l.servers[ep]; ok {
					ready = append(ready, b)
				}
			}
			l.ready.Store(&ready)
		}
		if c.Keys != nil {
			l.setKeys(*c.Keys)
			slog.Info("gateway lane: keys rotated", "keys", len(*c.Keys))
		}
		if c.Seq != 0 { // applied: every request from here on routes by it
			l.acked.Store(c.Seq)
			l.send(ackFrame(c.Seq)) // behind every report queued so far; dropped when full (stats repeat it)
		}
	}
}

// ------------------------------------------------------------------ frames (stdout)

func ackFrame(seq uint32) []byte {
	ack := make([]byte, 9)
	binary.LittleEndian.PutUint32(ack, 5)
	ack[4] = 3
	binary.LittleEndian.PutUint32(ack[5:], seq)
	return ack
}

// writeFrames writes the reports to the gateway in batches: what is waiting goes in one write,
// and a write waits up to flushDelay for more (or until flushBytes are buffered), so that at a
// low rate the gateway's reader wakes once per batch, not once per request (each wake-up has a
// fixed cost: the reader's code starts cold). Ready and ack frames (kinds 0 and 3) and failed
// requests (a canary's errors roll it back at once) are written at once.
func (l *lane) writeFrames(w *bufio.Writer) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false
	pending := 0 // bytes written to w since the last flush
	flush := func() bool {
		if err := w.Flush(); err != nil {
			return false
		}
		l.queued.Add(-int64(pending))
		pending = 0
		return true
	}
	for {
		select {
		case f := <-l.frames:
			urgent := urgentFrame(f)
			pending += len(f)
			if _, err := w.Write(f); err != nil {
				return // the gateway is gone (the next write to the pipe ends the process: SIGPIPE)
			}
			// what else is waiting goes in the same write: one pipe write per burst, not per request
			for n := len(l.frames); n > 0; n-- {
				g := <-l.frames
				urgent = urgent || urgentFrame(g)
				pending += len(g)
				if _, err := w.Write(g); err != nil {
					return
				}
			}
			if urgent || pending >= flushBytes {
				timer.Stop() // (Go 1.23+: no stale tick is received after Stop)
				armed = false
				if !flush() {
					return
				}
			} else if !armed {
				timer.Reset(flushDelay)
				armed = true
			}
		case <-timer.C:
			armed = false
			if !flush() {
				return
			}
		}
	}
}

// urgentFrame: a frame the gateway must read at once (ready, ack, a request that failed).
func urgentFrame(f []byte) bool {
	return f[4] == 0 || f[4] == 3 || (f[4] == 1 && codes.Code(f[5]) != codes.OK)
}

func (l *lane) send(frame []byte) {
	l.queued.Add(int64(len(frame)))
	select {
	case l.frames <- frame:
	default:
		l.queued.Add(-int64(len(frame)))
		l.dropped.Add(1)
	}
}

// drain waits (at most timeout) until every report queued so far is written to the gateway.
func (l *lane) drain(timeout time.Duration) {
	for deadline := time.Now().Add(timeout); l.queued.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

func (l *lane) stats() {
	for range time.Tick(time.Second) {
		out := map[string]int32{}
		for ep, b := range l.servers {
			out[ep] = b.outstanding.Load()
		}
		body, _ := json.Marshal(map[string]any{
			"outstanding": out, "dropped": l.dropped.Load(), "delegated": l.delegated.Load(),
			"log_dropped": l.logDropped.Load(),
		})
		frame := make([]byte, 5, 5+len(body))
		binary.LittleEndian.PutUint32(frame, uint32(1+len(body)))
		frame[4] = 2
		l.send(append(frame, body...))
		if seq := l.acked.Load(); seq != 0 {
			l.send(ackFrame(seq)) // an ack dropped on a full queue arrives now
		}
	}
}

// sampled: whether this served request goes to the inference log (deterministic: of every n
// requests, sample x n, evenly spread).
func (l *lane) sampled() bool {
	if l.sample >= 1 {
		return true
	}
	if l.sample <= 0 {
		return false
	}
	n := l.credit.Add(1)
	return int(float64(n)*l.sample) > int(float64(n-1)*l.sample)
}

func (l *lane) served(code codes.Code, version int, latency time.Duration, model, id string, req, resp []byte) {
	l.report(1, code, version, latency, model, id, req, resp, 0, 0)
}

// servedHTTP: an infer request the lane served on its REST port (the bodies as sent and
// answered, and the JSON part's length of each when binary data follows it; 0: all JSON).
func (l *lane) servedHTTP(version int, latency time.Duration, model, id string, req, resp []byte, reqHead, respHead int) {
	l.report(4, codes.OK, version, latency, model, id, req, resp, reqHead, respHead)
}

func (l *lane) report(kind byte, code codes.Code, version int, latency time.Duration, model, id string, req, resp []byte, reqHead, respHead int) {
	if !l.sampled() {
		req, resp = nil, nil
	} else if l.queued.Load()+int64(len(req)+len(resp)) > frameBudget {
		req, resp = nil, nil // the gateway reads slowly: the outcome goes up, the log record does not
		l.logDropped.Add(1)
	}
	extra := 0
	if kind == 4 {
		extra = 8
	}
	size := 4 + 1 + 1 + 4 + 8 + 8 + 4 + 4 + 4 + 4 + extra + len(model) + len(id) + len(req) + len(resp)
	f := make([]byte, size)
	le := binary.LittleEndian
	le.PutUint32(f, uint32(size-4))
	f[4] = kind
	f[5] = byte(code)
	le.PutUint32(f[6:], uint32(version))
	le.PutUint64(f[10:], math.Float64bits(latency.Seconds()))
	le.PutUint64(f[18:], math.Float64bits(float64(time.Now().UnixNano())/1e9))
	le.PutUint32(f[26:], uint32(len(model)))
	le.PutUint32(f[30:], uint32(len(id)))
	le.PutUint32(f[34:], uint32(len(req)))
	le.PutUint32(f[38:], uint32(len(resp)))
	p := 42
	if kind == 4 {
		le.PutUint32(f[42:], uint32(reqHead))
		le.PutUint32(f[46:], uint32(respHead))
		p = 50
	}
	p += copy(f[p:], model)
	p += copy(f[p:], id)
	p += copy(f[p:], req)
	copy(f[p:], resp)
	l.send(f)
}

// ------------------------------------------------------------------ the hot path

func (l *lane) handle(_ any, stream grpc.ServerStream) error {
	l.inflight.Add(1)
	defer l.inflight.Add(-1)
	method, ok := grpc.MethodFromServerStream(stream)
	if !ok {
		return status.Error(codes.Internal, "gateway lane: no method")
	}
	if l.budget != nil && method != streamInferMethod { // a stream's requests spend it one by one, in Python
		md, _ := metadata.FromIncomingContext(stream.Context())
		if !l.spend(md.Get("authorization")) {
			return status.Error(codes.ResourceExhausted, l.budget.message())
		}
	}
	if method == inferMethod {
		return l.infer(stream)
	}
	return l.proxy(stream, method)
}

// spend: one request of the budget of the key in vals (an authorization value), false when it is
// over; a value that is not a valid key spends nothing (the key check refuses it).
func (l *lane) spend(vals []string) bool {
	if l.budget == nil || l.keys().open() || len(vals) == 0 || !l.authorizedValue(vals) {
		return true
	}
	// the bucket of the key itself, however its header is spelled ("Bearer", "bearer  ")
	_, token, _ := strings.Cut(strings.TrimSpace(vals[0]), " ")
	sum := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return l.budget.allow(string(sum[:]), time.Now())
}

// budget: a token bucket per key (as cdl.auth.KeyBudget): rate requests a second, burst at once.
type budget struct {
	rate, burst float64
	mu          sync.Mutex
	buckets     map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newBudget(rate float64, burst int) *budget {
	if rate <= 0 {
		return nil
	}
	b := float64(burst)
	if burst <= 0 {
		b = math.Max(1, math.Ceil(rate))
	}
	return &budget{rate: rate, burst: b, buckets: map[string]*bucket{}}
}

func (b *budget) allow(key string, now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	k, ok := b.buckets[key]
	if !ok {
		if len(b.buckets) >= budgetsMax { // only valid keys come here: never in practice
			b.buckets = map[string]*bucket{}
		}
		k = &bucket{tokens: b.burst, last: now}
		b.buckets[key] = k
	}
	k.tokens = math.Min(b.burst, k.tokens+now.Sub(k.last).Seconds()*b.rate)
	k.last = now
	if k.tokens < 1 {
		return false
	}
	k.tokens--
	return true
}

func (b *budget) message() string {
	return fmt.Sprintf("this key is over its request budget (%g/s, bursts of %g); try again later", b.rate, b.burst)
}

func (l *lane) authorized(md metadata.MD) bool {
	return l.authorizedValue(md.Get("authorization"))
}

// authorizedValue: whether the first authorization value (gRPC metadata or HTTP header)
// carries an inference key.
func (l *lane) authorizedValue(vals []string) bool {
	ks := l.keys()
	if ks.open() {
		return true
	}
	if len(vals) == 0 {
		return false
	}
	header := vals[0]
	if _, ok := ks.verified.Load(header); ok {
		return true
	}
	// as cdl.auth: "<scheme> <key>", the scheme "bearer" in any case, spaces around trimmed
	scheme, token, _ := strings.Cut(strings.TrimSpace(header), " ")
	token = strings.TrimSpace(token)
	if !strings.EqualFold(scheme, "bearer") || token == "" {
		return false
	}
	sum := sha256.Sum256([]byte(token))
	digest := []byte(hex.EncodeToString(sum[:]))
	match := 0
	for _, k := range ks.digests {
		match |= subtle.ConstantTimeCompare(digest, k)
	}
	if match == 0 {
		return false
	}
	if ks.verifiedN.Add(1) <= keyCacheMax {
		ks.verified.Store(header, struct{}{})
	}
	return true
}

// keySet: the SHA-256 hex digests allowed for inference (none: open), with the authorization
// values verified against them; a rotation replaces the whole set, cache included.
type keySet struct {
	digests   [][]byte
	verified  sync.Map // authorization value -> struct{} (verified keys only)
	verifiedN atomic.Int32
}

func (k *keySet) open() bool { return len(k.digests) == 0 }

func (l *lane) keys() *keySet {
	if ks := l.auth.Load(); ks != nil {
		return ks
	}
	return &keySet{}
}

// setKeys: the inference keys from now on (digests; blanks ignored).
func (l *lane) setKeys(hashes []string) {
	ks := &keySet{}
	for _, h := range hashes {
		if h = strings.ToLower(strings.TrimSpace(h)); h != "" {
			ks.digests = append(ks.digests, []byte(h))
		}
	}
	l.auth.Store(ks)
}

func (l *lane) versionField(v int) []byte {
	if f, ok := l.versionFields.Load(v); ok {
		return f.([]byte)
	}
	f := stringField(0x12, strconv.Itoa(v))
	l.versionFields.Store(v, f)
	return f
}

// pick: the version that answers a request without an explicit one (as RoutingTable.pick:
// of every 1,000 requests the candidate answers canary x 1,000, evenly interleaved).
func (l *lane) pick(r route) int {
	if r.candidate == 0 || r.canary <= 0 || r.stable == 0 {
		if r.stable != 0 {
			return r.stable
		}
		return r.candidate
	}
	if r.canary >= 1 {
		return r.candidate
	}
	n := float64((l.tick.Add(1) - 1) % 1000)
	if int((n+1)*r.canary) > int(n*r.canary) {
		return r.candidate
	}
	return r.stable
}

func (l *lane) choose() *backend {
	ready := *l.ready.Load()
	n := len(ready)
	if n == 0 {
		return nil
	}
	start := int(l.rr.Add(1))
	var best *backend
	for i := 0; i < n; i++ {
		b := ready[(start+i)%n]
		if best == nil || b.outstanding.Load() < best.outstanding.Load() {
			best = b
		}
	}
	return best
}

func (l *lane) infer(stream grpc.ServerStream) error {
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	ctx := stream.Context()
	md, _ := metadata.FromIncomingContext(ctx)
	if !l.authorized(md) {
		return l.delegate(stream, md, req, 0, nil)
	}
	name, version, id, ok := scanRoute(req)
	if !ok {
		return l.delegate(stream, md, req, 0, nil)
	}
	r, ok := (*l.routes.Load())[name]
	if !ok || r.shadow > 0 {
		return l.delegate(stream, md, req, 0, nil)
	}
	var v int
	picked := version == ""
	data := req
	switch {
	case picked:
		if v = l.pick(r); v == 0 {
			return l.delegate(stream, md, req, 0, nil)
		}
		data = append(req[:len(req):len(req)], l.versionField(v)...)
	case r.stable != 0 && version == r.stableS:
		v = r.stable
	case r.candidate != 0 && version == r.candS:
		v = r.candidate
	default:
		return l.delegate(stream, md, req, 0, nil)
	}
	if id == "" {
		id = l.idPrefix + strconv.FormatUint(l.ids.Add(1), 10)
		data = append(data[:len(data):len(data)], stringField(0x1a, id)...)
	}
	b := l.choose()
	if b == nil {
		return l.delegate(stream, md, req, hint(picked, v), nil)
	}
	callCtx := ctx
	if _, has := ctx.Deadline(); !has {
		var cancel context.CancelFunc
		callCtx, cancel = context.WithTimeout(ctx, l.timeout)
		defer cancel()
	}
	b.outstanding.Add(1)
	start := time.Now()
	var resp []byte
	err := b.conn.Invoke(callCtx, inferMethod, &data, &resp)
	latency := time.Since(start)
	b.outstanding.Add(-1)
	if err == nil {
		l.served(codes.OK, v, latency, name, id, data, resp)
		return stream.SendMsg(&resp)
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return err // the client went away: nothing to answer or count (as the Python gateway)
	}
	if ctx.Err() != nil || callCtx.Err() != nil {
		// no time left to hand it on: the version's failure, as the Python gateway counts it
		l.served(codes.DeadlineExceeded, v, latency, name, id, data, nil)
		return status.Error(codes.DeadlineExceeded, status.Convert(err).Message())
	}
	// Triton failed it: the Python gateway decides what that means (another server, the
	// stable version for a canary request, the client's fault) and answers
	st := status.Convert(err)
	if st.Code() == codes.Unavailable || st.Code() == codes.NotFound {
		return l.delegate(stream, md, req, hint(picked, v), nil) // sent again, to another server
	}
	return l.delegate(stream, md, req, hint(picked, v), &failure{st.Code(), st.Message(), latency})
}

// failure is Triton's answer to a request the lane hands over: the Python gateway takes it as
// its own forward's answer (it does not send the request again).
type failure struct {
	code    codes.Code
	details string
	latency time.Duration
}

func hint(picked bool, v int) int {
	if picked {
		return v
	}
	return 0
}

// outgoing is the client's metadata as the backend gets it: transport headers and any
// x-cdl-lane-* a client sent are dropped; hint (a version the lane picked) is added.
func outgoing(ctx context.Context, md metadata.MD, hintVersion int, failed *failure) context.Context {
	out := metadata.MD{}
	for k, vs := range md {
		if strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || strings.HasPrefix(k, "x-cdl-lane") ||
			k == "content-type" || k == "user-agent" || k == "te" {
			continue
		}
		out[k] = vs
	}
	if hintVersion != 0 {
		out.Set(hintKey, strconv.Itoa(hintVersion))
	}
	if failed != nil {
		out.Set(codeKey, strconv.Itoa(int(failed.code)))
		out.Set(detailsKey, failed.details)
		out.Set(latencyKey, strconv.FormatInt(failed.latency.Microseconds(), 10))
	}
	return metadata.NewOutgoingContext(ctx, out)
}

func (l *lane) delegate(stream grpc.ServerStream, md metadata.MD, req []byte, hintVersion int, failed *failure) error {
	l.delegated.Add(1)
	var resp []byte
	var header, trailer metadata.MD
	err := l.backend.Invoke(
		outgoing(stream.Context(), md, hintVersion, failed), inferMethod, &req, &resp, grpc.Header(&header), grpc.Trailer(&trailer),
	)
	if len(header) > 0 {
		_ = stream.SetHeader(header)
	}
	if len(trailer) > 0 {
		stream.SetTrailer(trailer)
	}
	if err != nil {
		return err
	}
	return stream.SendMsg(&resp)
}

var passthrough = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// proxy hands any other call to the backend as a stream of bytes both ways (unary calls,
// the health service's Watch), with the client's metadata and deadline, and the backend's
// headers, trailers and status back.
func (l *lane) proxy(stream grpc.ServerStream, method string) error {
	ctx := stream.Context()
	md, _ := metadata.FromIncomingContext(ctx)
	ctx, cancel := context.WithCancel(outgoing(ctx, md, 0, nil))
	defer cancel()
	cs, err := l.backend.NewStream(ctx, passthrough, method)
	if err != nil {
		return err
	}
	upErr := make(chan error, 1)
	go func() {
		for {
			var m []byte
			if err := stream.RecvMsg(&m); err != nil {
				if errors.Is(err, io.EOF) {
					upErr <- cs.CloseSend()
				} else {
					upErr <- err
				}
				return
			}
			if err := cs.SendMsg(&m); err != nil {
				upErr <- nil // the backend's status comes from RecvMsg below
				return
			}
		}
	}()
	if header, err := cs.Header(); err == nil && len(header) > 0 {
		_ = stream.SendHeader(header)
	}
	for {
		var m []byte
		if err := cs.RecvMsg(&m); err != nil {
			stream.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := stream.SendMsg(&m); err != nil {
			return err
		}
		select {
		case err := <-upErr:
			if err != nil {
				cancel()
				return err
			}
			upErr = nil
		default:
		}
	}
}
