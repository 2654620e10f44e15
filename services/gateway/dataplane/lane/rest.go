package main

// The lane's REST/HTTP v2 port: POST /v2/models/{m}[/versions/{v}]/infer on the common path is
// forwarded to a Triton server's HTTP port by the lane itself, like ModelInfer on the gRPC
// port (the same keys, routing table, servers, ids and reports); every other request, and
// every infer request the lane does not serve itself, goes to the Python gateway's REST server
// on its unix socket, as it came (with x-cdl-lane-version, and Triton's failure in
// x-cdl-lane-code, x-cdl-lane-details (base64) and x-cdl-lane-latency-us, as on the gRPC
// port), so that the Python gateway stays the one that writes error bodies.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
)

const (
	headerLength   = "Inference-Header-Content-Length"
	httpDetailsKey = "x-cdl-lane-details"
	httpBackoff    = 2 * time.Second // a Triton HTTP port that refused a connection is left alone this long
)

// restBackend is the reverse proxy to the Python gateway's REST server (a unix socket).
func restBackend(sock string) *httputil.ReverseProxy {
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second, // under aiohttp's keep-alive (75 s): it never closes one first
		DisableCompression:  true,
	}
	return &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL.Scheme, r.Out.URL.Host = "http", "cdl-gateway"
			r.Out.Host = r.In.Host
		},
		Transport: transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(r.Context().Err(), context.Canceled) {
				return // the client went away
			}
			writeError(w, http.StatusServiceUnavailable, "the gateway is not serving (its backend is unreachable)")
		},
	}
}

func writeError(w http.ResponseWriter, status int, msg string) {
	body, _ := json.Marshal(map[string]string{"error": msg})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// tritonTransport: keep-alive connections to the Triton servers' HTTP ports.
func tritonTransport() *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true, // what Triton answers is what the client gets, and the log reads
	}
}

// inferPath: the model and version (empty: none) of /v2/models/{m}[/versions/{v}]/infer, for
// names the lane forwards as they are (letters, digits, '_', '-', '.').
func inferPath(p string) (model, version string, ok bool) {
	rest, found := strings.CutPrefix(p, "/v2/models/")
	if !found {
		return "", "", false
	}
	rest, found = strings.CutSuffix(rest, "/infer")
	if !found {
		return "", "", false
	}
	model, version, hasVersion := strings.Cut(rest, "/versions/")
	if !plainName(model) || (hasVersion && !plainName(version)) {
		return "", "", false
	}
	return model, version, true
}

func plainName(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// serveHTTP: the public REST port.
func (l *lane) serveHTTP(w http.ResponseWriter, r *http.Request) {
	l.inflight.Add(1)
	defer l.inflight.Add(-1)
	for k := range r.Header { // what only the lane may say
		if strings.HasPrefix(strings.ToLower(k), "x-cdl-lane") {
			delete(r.Header, k)
		}
	}
	if !strings.HasPrefix(r.URL.Path, "/v2/health/") && !l.spend(r.Header.Values("Authorization")) { // probes are free
		writeError(w, http.StatusTooManyRequests, l.budget.message())
		return
	}
	if r.Method != http.MethodPost || !l.httpServers || r.Header.Get("Content-Encoding") != "" {
		l.rest.ServeHTTP(w, r)
		return
	}
	name, version, ok := inferPath(r.URL.Path)
	if !ok || r.URL.RawQuery != "" {
		l.rest.ServeHTTP(w, r)
		return
	}
	auth := r.Header.Values("Authorization")
	if !l.authorizedValue(auth) {
		l.rest.ServeHTTP(w, r)
		return
	}
	body, whole, err := readBody(r.Body, r.ContentLength, l.maxBytes)
	if err != nil {
		return // the client went away mid-body
	}
	if !whole { // too large: the Python gateway refuses it (413) as it reads
		r.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), r.Body))
		l.rest.ServeHTTP(w, r)
		return
	}
	l.inferHTTP(w, r, name, version, body)
}

// readBody reads at most max bytes; whole is false when there is more.
func readBody(body io.Reader, length int64, max int) (data []byte, whole bool, err error) {
	size := 4096
	if length > 0 && length <= int64(max) {
		size = int(length) + 1
	}
	buf := bytes.NewBuffer(make([]byte, 0, size))
	n, err := buf.ReadFrom(io.LimitReader(body, int64(max)+1))
	if err != nil {
		return nil, false, err
	}
	return buf.Bytes(), n <= int64(max), nil
}

func (l *lane) inferHTTP(w http.ResponseWriter, r *http.Request, name, version string, body []byte) {
	delegate := func(hintVersion int, failed *failure) {
		l.delegateHTTP(w, r, body, hintVersion, failed)
	}
	headLen := len(body)
	binary := false
	if v := r.Header.Get(headerLength); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > len(body) {
			delegate(0, nil)
			return
		}
		headLen, binary = n, true
	}
	head := body[:headLen]
	if bytes.Contains(head, []byte("shared_memory")) { // refused by the Python gateway, with why
		delegate(0, nil)
		return
	}
	id, has, insertAt, emptyID, ok := scanJSONID(head)
	if !ok {
		delegate(0, nil)
		return
	}
	rt, ok := (*l.routes.Load())[name]
	if !ok || rt.shadow > 0 {
		delegate(0, nil)
		return
	}
	var v int
	picked := version == ""
	switch {
	case picked:
		if v = l.pick(rt); v == 0 {
			delegate(0, nil)
			return
		}
	case rt.stable != 0 && version == rt.stableS:
		v = rt.stable
	case rt.candidate != 0 && version == rt.candS:
		v = rt.candidate
	default:
		delegate(0, nil)
		return
	}
	data := body
	if !has {
		id = l.idPrefix + strconv.FormatUint(l.ids.Add(1), 10)
		member := `"id":"` + id + `",`
		if emptyID { // "id":"" -- the id goes between its quotes
			member = id
		}
		data = make([]byte, 0, len(body)+len(member))
		data = append(append(append(data, body[:insertAt]...), member...), body[insertAt:]...)
		if binary {
			headLen += len(member)
		}
	}
	b := l.choose()
	if b == nil || b.httpDown.Load() > time.Now().UnixNano() {
		delegate(hint(picked, v), nil) // its HTTP port failed a moment ago: the Python pool (gRPC) answers
		return
	}
	target := "http://" + b.http + "/v2/models/" + url.PathEscape(name) + "/versions/" + strconv.Itoa(v) + "/infer"
	ctx, cancel := context.WithTimeout(r.Context(), l.timeout)
	defer cancel()
	out, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(data))
	if err != nil {
		delegate(hint(picked, v), nil)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		out.Header.Set("Content-Type", ct)
	} else {
		out.Header.Set("Content-Type", "application/json")
	}
	if binary {
		out.Header.Set(headerLength, strconv.Itoa(headLen))
	}
	b.outstanding.Add(1)
	start := time.Now()
	resp, err := l.tritonHTTP.Do(out)
	var answer []byte
	whole := false
	if err == nil {
		answer, whole, err = readBody(resp.Body, resp.ContentLength, l.maxBytes)
		_ = resp.Body.Close()
	}
	latency := time.Since(start)
	b.outstanding.Add(-1)
	if err == nil && resp.StatusCode == http.StatusOK && whole {
		respHead := 0
		if h := resp.Header.Get(headerLength); h != "" {
			if n, perr := strconv.Atoi(h); perr == nil && n > 0 && n <= len(answer) {
				respHead = n
			}
		}
		reqHead := 0
		if binary {
			reqHead = headLen
		}
		l.servedHTTP(v, latency, name, id, data, answer, reqHead, respHead)
		hdr := w.Header()
		if ct := resp.Header.Get("Content-Type"); ct != "" {
			hdr.Set("Content-Type", ct)
		}
		if respHead > 0 {
			hdr.Set(headerLength, strconv.Itoa(respHead))
		}
		hdr.Set("Content-Length", strconv.Itoa(len(answer)))
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(answer)
		return
	}
	if errors.Is(r.Context().Err(), context.Canceled) {
		return // the client went away: nothing to answer or count (as the Python gateway)
	}
	if ctx.Err() != nil {
		// no time left: the version's failure, answered by the Python gateway without a retry
		delegate(hint(picked, v), &failure{codes.DeadlineExceeded, "deadline exceeded (Triton over HTTP)", latency})
		return
	}
	if err != nil { // not reached, or no whole answer: sent again by the Python gateway
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			b.httpDown.Store(time.Now().Add(httpBackoff).UnixNano()) // not tried again for a while
		}
		delegate(hint(picked, v), nil)
		return
	}
	if !whole {
		delegate(hint(picked, v), &failure{codes.ResourceExhausted, "Triton's answer is larger than the gateway's limit", latency})
		return
	}
	code := httpCode(resp.StatusCode)
	if code == codes.Unavailable || code == codes.NotFound {
		delegate(hint(picked, v), nil) // sent again, to another server
		return
	}
	delegate(hint(picked, v), &failure{code, tritonError(answer), latency})
}

// httpCode: the gRPC code of a Triton HTTP status (as Triton maps its errors).
func httpCode(status int) codes.Code {
	switch status {
	case http.StatusBadRequest:
		return codes.InvalidArgument
	case http.StatusNotFound:
		return codes.NotFound
	case http.StatusServiceUnavailable:
		return codes.Unavailable
	case http.StatusGatewayTimeout, http.StatusRequestTimeout:
		return codes.DeadlineExceeded
	case http.StatusTooManyRequests, http.StatusRequestEntityTooLarge:
		return codes.ResourceExhausted
	case http.StatusNotImplemented:
		return codes.Unimplemented
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusConflict:
		return codes.AlreadyExists
	case 499:
		return codes.Canceled
	default:
		return codes.Internal
	}
}

// tritonError: the message of Triton's JSON error body (the body, cut short, when it is not one).
func tritonError(body []byte) string {
	if len(body) > 4096 {
		body = body[:4096]
	}
	var doc struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(body, &doc); err == nil && doc.Error != "" {
		return doc.Error
	}
	return strings.TrimSpace(string(body))
}

// delegateHTTP hands the request, as the client sent it, to the Python gateway's REST server.
func (l *lane) delegateHTTP(w http.ResponseWriter, r *http.Request, body []byte, hintVersion int, failed *failure) {
	l.delegated.Add(1)
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	r.ContentLength = int64(len(body))
	if hintVersion != 0 {
		r.Header.Set(hintKey, strconv.Itoa(hintVersion))
	}
	if failed != nil {
		r.Header.Set(codeKey, strconv.Itoa(int(failed.code)))
		r.Header.Set(httpDetailsKey, base64.StdEncoding.EncodeToString([]byte(failed.details)))
		r.Header.Set(latencyKey, strconv.FormatInt(failed.latency.Microseconds(), 10))
	}
	l.rest.ServeHTTP(w, r)
}
