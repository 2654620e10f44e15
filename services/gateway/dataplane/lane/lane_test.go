package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protowire"
)

func field(num protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestScanRoute(t *testing.T) {
	tensor := cat(field(1, "input"), field(2, "FP32"))
	raw := protowire.AppendBytes(protowire.AppendTag(nil, 7, protowire.BytesType), make([]byte, 256))
	varint := protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 1<<40)
	fixed := protowire.AppendFixed64(protowire.AppendTag(nil, 10, protowire.Fixed64Type), 7)
	group := cat(protowire.AppendTag(nil, 11, protowire.StartGroupType), protowire.AppendTag(nil, 11, protowire.EndGroupType))
	cases := []struct {
		name               string
		in                 []byte
		model, version, id string
		ok                 bool
	}{
		{"empty", nil, "", "", "", true},
		{"all three", cat(field(1, "m"), field(2, "3"), field(3, "r1")), "m", "3", "r1", true},
		{"tensors skipped", cat(field(5, string(tensor)), raw, field(1, "m"), varint, fixed), "m", "", "", true},
		{"last wins", cat(field(1, "a"), field(2, "1"), field(1, "b"), field(2, "2")), "b", "2", "", true},
		{"name as varint", protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1), "", "", "", false},
		{"group", cat(field(1, "m"), group), "", "", "", false},
		{"truncated length", cat(field(1, "m"), []byte{0x2a, 0x10, 0x01}), "", "", "", false},
		{"truncated tag", []byte{0x80}, "", "", "", false},
		{"field 0", []byte{0x02, 0x00}, "", "", "", false},
		{"wire type 6", []byte{0x0e}, "", "", "", false},
		{"invalid utf-8", field(1, "\xff\xfe"), "", "", "", false},
		{"tag of 6 bytes", cat([]byte{0x8a, 0x80, 0x80, 0x80, 0x80, 0x00, 0x00}), "", "", "", false},
	}
	for _, c := range cases {
		m, v, id, ok := scanRoute(c.in)
		if ok != c.ok || (ok && (m != c.model || v != c.version || id != c.id)) {
			t.Errorf("%s: got (%q, %q, %q, %v), want (%q, %q, %q, %v)", c.name, m, v, id, ok, c.model, c.version, c.id, c.ok)
		}
	}
}

// FuzzScanRoute: never panics; what it accepts it reads from the input, valid UTF-8; a version
// field appended to an accepted request is the version read (the lane's one-copy routing).
func FuzzScanRoute(f *testing.F) {
	f.Add(cat(field(1, "m"), field(2, "3"), field(3, "r1")))
	f.Add(cat(field(1, "m"), protowire.AppendBytes(protowire.AppendTag(nil, 7, protowire.BytesType), []byte{1, 2, 3})))
	f.Add([]byte{0x0a, 0x80, 0x01})
	f.Fuzz(func(t *testing.T, in []byte) {
		m, v, id, ok := scanRoute(in)
		if !ok {
			return
		}
		for _, s := range []string{m, v, id} {
			if !utf8.ValidString(s) || !bytes.Contains(in, []byte(s)) {
				t.Fatalf("read %q, not a valid string of the input", s)
			}
		}
		m2, v2, id2, ok2 := scanRoute(append(append([]byte(nil), in...), stringField(0x12, "42")...))
		if !ok2 || m2 != m || v2 != "42" || id2 != id {
			t.Fatalf("appended version not read: (%q, %q, %q, %v)", m2, v2, id2, ok2)
		}
	})
}

func TestPickSpreadsTheCanaryShare(t *testing.T) {
	l := &lane{}
	r := route{stable: 1, candidate: 2, canary: 0.1}
	n := 0
	for i := 0; i < 1000; i++ {
		if l.pick(r) == 2 {
			n++
		}
	}
	if n != 100 {
		t.Fatalf("candidate answered %d of 1000, want 100", n)
	}
	if v := l.pick(route{stable: 0, candidate: 5, canary: 0.5}); v != 5 {
		t.Fatalf("first version: got %d", v)
	}
	if v := l.pick(route{stable: 3, candidate: 5, canary: 1}); v != 5 {
		t.Fatalf("canary 1: got %d", v)
	}
	if v := l.pick(route{stable: 3}); v != 3 {
		t.Fatalf("stable alone: got %d", v)
	}
}

func TestAuthorized(t *testing.T) {
	sum := sha256.Sum256([]byte("k1"))
	l := &lane{}
	l.setKeys([]string{hex.EncodeToString(sum[:])})
	for _, c := range []struct {
		md   metadata.MD
		want bool
	}{
		{metadata.Pairs("authorization", "Bearer k1"), true},
		{metadata.Pairs("authorization", "Bearer k1"), true}, // cached
		{metadata.Pairs("authorization", "Bearer k2"), false},
		{metadata.Pairs("authorization", "k1"), false},
		{metadata.MD{}, false},
	} {
		if got := l.authorized(c.md); got != c.want {
			t.Errorf("%v: got %v", c.md, got)
		}
	}
	if !(&lane{}).authorized(metadata.MD{}) {
		t.Error("no keys configured: open")
	}
	// rotated: k2 from now on, k1 (verified and cached before) no more
	sum2 := sha256.Sum256([]byte("k2"))
	l.readControl(strings.NewReader(`{"keys":["` + hex.EncodeToString(sum2[:]) + `"]}` + "\n"))
	if l.authorized(metadata.Pairs("authorization", "Bearer k1")) || !l.authorized(metadata.Pairs("authorization", "Bearer k2")) {
		t.Error("a rotation replaces the keys, and the cache of verified ones")
	}
}

func TestBudgetPerKey(t *testing.T) {
	sum := sha256.Sum256([]byte("k1"))
	sum2 := sha256.Sum256([]byte("k2"))
	l := &lane{}
	l.setKeys([]string{hex.EncodeToString(sum[:]), hex.EncodeToString(sum2[:])})
	l.budget = newBudget(2, 3) // 2/s, bursts of 3
	k1, k2 := []string{"Bearer k1"}, []string{"Bearer k2"}
	for i := 0; i < 3; i++ {
		if !l.spend(k1) {
			t.Fatalf("request %d within the burst refused", i)
		}
	}
	if l.spend(k1) {
		t.Fatal("a fourth request at once passed")
	}
	if !l.spend(k2) {
		t.Fatal("another key was refused: budgets are per key")
	}
	if !l.spend([]string{"Bearer wrong"}) || !l.spend(nil) {
		t.Fatal("a request without a valid key spends nothing (the key check refuses it)")
	}
	now := time.Now()
	b := newBudget(2, 1)
	if !b.allow("k", now) || b.allow("k", now) || !b.allow("k", now.Add(500*time.Millisecond)) {
		t.Fatal("the bucket refills at its rate")
	}
	if newBudget(0, 5) != nil {
		t.Fatal("rate 0: no budget")
	}
}

func TestSampled(t *testing.T) {
	l := &lane{sample: 0.25}
	n := 0
	for i := 0; i < 1000; i++ {
		if l.sampled() {
			n++
		}
	}
	if n != 250 {
		t.Fatalf("sampled %d of 1000, want 250", n)
	}
}

func TestUrgentFrame(t *testing.T) {
	frame := func(kind, code byte) []byte { return []byte{0, 0, 0, 0, kind, code} }
	cases := []struct {
		name   string
		f      []byte
		urgent bool
	}{
		{"ready", frame(0, 0), true},
		{"ack", frame(3, 0), true},
		{"served ok", frame(1, 0), false},
		{"served unavailable", frame(1, 14), true},
		{"served invalid argument", frame(1, 3), true},
		{"served over REST", frame(4, 0), false},
		{"stats", frame(2, 0), false},
	}
	for _, c := range cases {
		if got := urgentFrame(c.f); got != c.urgent {
			t.Errorf("%s: urgent %v, want %v", c.name, got, c.urgent)
		}
	}
}
