package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"strconv"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// scanRoute reads a ModelInferRequest's routing fields (model_name = 1, model_version = 2,
// id = 3) by walking its top-level fields with protowire, skipping the rest in O(1) each.
//
// It is conservative: ok is false for anything the lane leaves to the Python gateway (which
// gives the client the precise error): bad framing, groups, a routing field with another
// wire type, a tag longer than 5 bytes, invalid UTF-8. Where it returns ok, it reads what a
// protobuf parser reads: the last occurrence of each field wins.
func scanRoute(b []byte) (name, version, id string, ok bool) {
	var nameB, versionB, idB []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || n > 5 || num < 1 || num > protowire.MaxValidNumber {
			return "", "", "", false
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType, protowire.Fixed32Type, protowire.Fixed64Type, protowire.BytesType:
		default: // groups (deprecated, never sent by clients) and invalid wire types
			return "", "", "", false
		}
		if num <= 3 {
			if typ != protowire.BytesType {
				return "", "", "", false
			}
			v, m := protowire.ConsumeBytes(b)
			if m < 0 || !utf8.Valid(v) { // every occurrence, as the Python scan (and upb)
				return "", "", "", false
			}
			switch num {
			case 1:
				nameB = v
			case 2:
				versionB = v
			default:
				idB = v
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return "", "", "", false
		}
		b = b[m:]
	}
	return string(nameB), string(versionB), string(idB), true
}

// stringField is a length-delimited field (tag byte tag) holding s, as appended to a request:
// an appended occurrence is the last one, so it wins.
func stringField(tag byte, s string) []byte {
	out := make([]byte, 0, 1+protowire.SizeVarint(uint64(len(s)))+len(s))
	out = append(out, tag)
	out = protowire.AppendVarint(out, uint64(len(s)))
	return append(out, s...)
}

// canonicalVersion is v as the gateway names versions ("3"), for comparing an explicit one.
func canonicalVersion(v int) string { return strconv.Itoa(v) }

// scanStream is the differential test's hook (--scan): requests in (each a u32 length, then
// the bytes), and per request out: u8 ok, then when ok the three strings, each u32 length and
// bytes.
func scanStream(r io.Reader, w io.Writer) error {
	in := bufio.NewReader(r)
	out := bufio.NewWriter(w)
	var n [4]byte
	for {
		if _, err := io.ReadFull(in, n[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return out.Flush()
			}
			return err
		}
		req := make([]byte, binary.LittleEndian.Uint32(n[:]))
		if _, err := io.ReadFull(in, req); err != nil {
			return err
		}
		name, version, id, ok := scanRoute(req)
		if !ok {
			out.WriteByte(0)
			continue
		}
		out.WriteByte(1)
		for _, s := range []string{name, version, id} {
			binary.LittleEndian.PutUint32(n[:], uint32(len(s)))
			out.Write(n[:])
			out.WriteString(s)
		}
	}
}
