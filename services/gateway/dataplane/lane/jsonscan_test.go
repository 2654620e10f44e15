package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestScanJSONID(t *testing.T) {
	cases := []struct {
		name, in string
		id       string
		has, ok  bool
	}{
		{"no id", `{"inputs":[{"name":"x","data":[1,2]}]}`, "", false, true},
		{"id first", `{"id":"r1","inputs":[]}`, "r1", true, true},
		{"id last, spaces", " {\n \"inputs\" : [ {\"a\":\"}\"} ] ,\t\"id\" : \"r-2\" } \n", "r-2", true, true},
		{"id inside a value is not the id", `{"inputs":[{"id":"x","name":"id"}],"parameters":{"id":"y"}}`, "", false, true},
		{"strings with braces and escapes", `{"s":"a\"}{[","t":"\\","u":[{"v":"]"}]}`, "", false, true},
		{"scalars", `{"a":1.5e3,"b":true,"c":null,"d":-2}`, "", false, true},
		{"empty object", `{}`, "", false, false},
		{"not an object", `[{"id":"x"}]`, "", false, false},
		{"id not a string", `{"id":5}`, "", false, false},
		{"id with an escape", `{"id":"a\"b"}`, "", false, false},
		{"escaped key", `{"\u0069d":"x","inputs":[]}`, "", false, false},
		{"two ids", `{"id":"a","id":"b"}`, "", false, false},
		{"trailing garbage", `{"a":1} x`, "", false, false},
		{"empty id (taken as none)", `{"id":"","inputs":[]}`, "", false, true},
		{"escaped key inside", `{"inputs":[{"parameters":{"shared\u005fmemory_region":"r"}}]}`, "", false, false},
		{"duplicate key", `{"inputs":[1],"inputs":[2]}`, "", false, false},
		{"duplicate key inside", `{"inputs":[{"data":[1],"data":[2]}]}`, "", false, false},
		{"bad literal", `{"a":tru}`, "", false, false},
		{"bad number", `{"a":-}`, "", false, false},
		{"leading zero", `{"a":01}`, "", false, false},
		{"mismatched brackets", `{"a":[}}`, "", false, false},
		{"bad escape", `{"a":"\x"}`, "", false, false},
		{"numbers", `{"a":[0,-1,2.5,1e9,-0.5E-3,1E+2]}`, "", false, true},
		{"escapes in values", `{"a":"\"\\\/\b\f\n\r\t\u00e9"}`, "", false, true},
		{"unterminated", `{"a":[1,2`, "", false, false},
		{"missing colon", `{"a" 1}`, "", false, false},
		{"control character in a string", "{\"a\":\"x\ny\"}", "", false, false},
		{"too deep", `{"a":` + strings.Repeat("[", maxDepth+1) + strings.Repeat("]", maxDepth+1) + `}`, "", false, false},
	}
	for _, c := range cases {
		id, has, at, _, ok := scanJSONID([]byte(c.in))
		if ok != c.ok || (ok && (id != c.id || has != c.has)) {
			t.Errorf("%s: got (%q, %v, %v), want (%q, %v, %v)", c.name, id, has, ok, c.id, c.has, c.ok)
		}
		if ok && c.in[at-1] != '{' && c.in[at-1] != '"' { // after the brace, or inside an empty id's quotes
			t.Errorf("%s: insertion point %d is not after the opening brace", c.name, at)
		}
	}
}

func TestAnEmptyIDGetsTheCharactersOfOne(t *testing.T) {
	in := []byte(`{"inputs":[{"id":""}], "id" : "" ,"outputs":[]}`)
	_, has, at, empty, ok := scanJSONID(in)
	if !ok || has || !empty {
		t.Fatalf("got has %v, empty %v, ok %v", has, empty, ok)
	}
	out := string(in[:at]) + "gw-1" + string(in[at:])
	var doc map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil || doc["id"] != "gw-1" {
		t.Fatalf("%s: %v %v", out, doc, err)
	}
}

func TestInferPath(t *testing.T) {
	cases := []struct {
		in, model, version string
		ok                 bool
	}{
		{"/v2/models/digits/infer", "digits", "", true},
		{"/v2/models/digits/versions/3/infer", "digits", "3", true},
		{"/v2/models/a.b-c_d/versions/12/infer", "a.b-c_d", "12", true},
		{"/v2/models/digits/ready", "", "", false},
		{"/v2/models//infer", "", "", false},
		{"/v2/models/../infer", "", "", false},
		{"/v2/models/a b/infer", "", "", false},
		{"/v2/models/digits/versions//infer", "", "", false},
		{"/v2/models/digits/versions/1/2/infer", "", "", false},
	}
	for _, c := range cases {
		m, v, ok := inferPath(c.in)
		if ok != c.ok || m != c.model || v != c.version {
			t.Errorf("%s: got (%q, %q, %v)", c.in, m, v, ok)
		}
	}
}

// FuzzScanJSONID: never panics; what it accepts is valid JSON, whose top-level "id" it reads as
// encoding/json does; inserting a member where it says gives valid JSON with that id.
func FuzzScanJSONID(f *testing.F) {
	f.Add([]byte(`{"id":"r1","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}`))
	f.Add([]byte(`{"inputs":[{"name":"x","parameters":{"binary_data_size":8}}],"outputs":[{"name":"y"}]}`))
	f.Add([]byte(`{"s":"a\"}{[","t":"\\","u":[{"v":"]"}],"id":"z"}`))
	f.Add([]byte(`{"a":[[[{"b":null}]]],"c":-1.5e-3}`))
	f.Add([]byte(`{"id":"","inputs":[{"id":""}]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		id, has, at, empty, ok := scanJSONID(in)
		if !ok {
			return
		}
		if !json.Valid(in) {
			t.Fatalf("accepted %q, which is not valid JSON", in)
		}
		var doc map[string]json.RawMessage
		if err := json.Unmarshal(in, &doc); err != nil {
			t.Fatalf("accepted %q, which encoding/json does not read as an object: %v", in, err)
		}
		raw, want := doc["id"]
		if empty { // an empty id gets the characters
			if string(raw) != `""` {
				t.Fatalf("%q: an empty id, encoding/json %s", in, raw)
			}
			out := bytes.Join([][]byte{in[:at], []byte(`gw-1`), in[at:]}, nil)
			var again map[string]json.RawMessage
			if err := json.Unmarshal(out, &again); err != nil || string(again["id"]) != `"gw-1"` {
				t.Fatalf("filling the empty id of %q gave %q (%v)", in, out, err)
			}
			return
		}
		if has != want {
			t.Fatalf("%q: has id %v, encoding/json %v", in, has, want)
		}
		if has {
			var s string
			if err := json.Unmarshal(raw, &s); err != nil || s != id {
				t.Fatalf("%q: id %q, encoding/json %s", in, id, raw)
			}
			return
		}
		out := bytes.Join([][]byte{in[:at], []byte(`"id":"gw-1",`), in[at:]}, nil)
		var again map[string]json.RawMessage
		if err := json.Unmarshal(out, &again); err != nil || string(again["id"]) != `"gw-1"` {
			t.Fatalf("inserting an id into %q gave %q (%v)", in, out, err)
		}
	})
}
