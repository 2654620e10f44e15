package main

import "unicode/utf8"

// scanJSONID reads what the lane needs of a REST infer request's JSON part (the whole body,
// or its first Inference-Header-Content-Length bytes): whether the top-level object has an
// "id" member, its value, and where the lane's id goes: as a member just after the opening
// brace, or, for an empty "id" (none, to the Python gateway as to Triton's clients: empty is
// then true, has false), as characters just inside its quotes. It walks the whole document as
// a validator does (strings and their escapes, numbers, literals, nesting), decoding nothing
// but the id.
//
// It is conservative: ok is false for anything the lane leaves to the Python gateway (which
// gives the client the precise error, or refuses what must not reach Triton): invalid JSON,
// not an object, an empty object, a key with an escape at any depth (it could spell "id" or
// "shared_memory_region"), a key twice in one object or an object of more than maxKeys keys
// (a reader taking the first and one taking the last would see different requests), an "id"
// that is not a plain string (an escape, a control character, invalid UTF-8), nesting
// deeper than maxDepth. Where it returns ok, encoding/json reads the same id.
func scanJSONID(b []byte) (id string, has bool, insertAt int, empty bool, ok bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' || skipSpace(b, i+1) >= len(b) || b[skipSpace(b, i+1)] == '}' {
		return "", false, 0, false, false // not an object, or no inputs: the Python gateway says so
	}
	s := scanner{b: b, emptyAt: -1}
	end := s.value(i, 0)
	if end < 0 || skipSpace(b, end) != len(b) {
		return "", false, 0, false, false
	}
	if s.emptyAt >= 0 {
		return "", false, s.emptyAt, true, true
	}
	return s.id, s.hasID, i + 1, false, true
}

// maxDepth bounds the nesting followed (deeper input is left to the Python gateway).
const maxDepth = 64

// maxKeys bounds the keys of one object (their duplicates are looked for pairwise).
const maxKeys = 64

type scanner struct {
	b       []byte
	id      string
	hasID   bool
	emptyAt int // where the characters of an empty top-level "id" go (-1: none)
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// value: the index after the JSON value at b[i] (-1 where there is none, or it is refused).
func (s *scanner) value(i, depth int) int {
	b := s.b
	if i >= len(b) || depth > maxDepth {
		return -1
	}
	switch c := b[i]; {
	case c == '"':
		end, _ := skipString(b, i)
		return end
	case c == '{':
		return s.object(i, depth)
	case c == '[':
		i = skipSpace(b, i+1)
		if i < len(b) && b[i] == ']' {
			return i + 1
		}
		for {
			if i = s.value(i, depth+1); i < 0 {
				return -1
			}
			i = skipSpace(b, i)
			if i >= len(b) {
				return -1
			}
			if b[i] == ']' {
				return i + 1
			}
			if b[i] != ',' {
				return -1
			}
			i = skipSpace(b, i+1)
		}
	case c == 't':
		return literal(b, i, "true")
	case c == 'f':
		return literal(b, i, "false")
	case c == 'n':
		return literal(b, i, "null")
	default:
		return skipNumber(b, i)
	}
}

func (s *scanner) object(i, depth int) int {
	b := s.b
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return i + 1
	}
	var keys [][]byte
	for {
		if i >= len(b) || b[i] != '"' {
			return -1
		}
		end, escaped := skipString(b, i)
		if end < 0 || escaped || len(keys) >= maxKeys {
			return -1
		}
		key := b[i+1 : end-1]
		for _, k := range keys {
			if string(k) == string(key) {
				return -1
			}
		}
		keys = append(keys, key)
		i = skipSpace(b, end)
		if i >= len(b) || b[i] != ':' {
			return -1
		}
		i = skipSpace(b, i+1)
		if depth == 0 && string(key) == "id" { // a plain non-empty string, or the Python gateway's
			if i >= len(b) || b[i] != '"' {
				return -1
			}
			vend, vescaped := skipString(b, i)
			if vend < 0 || vescaped || !utf8.Valid(b[i+1:vend-1]) {
				return -1
			}
			if vend-i == 2 {
				s.emptyAt = i + 1
			} else {
				s.id, s.hasID = string(b[i+1:vend-1]), true
			}
			i = vend
		} else if i = s.value(i, depth+1); i < 0 {
			return -1
		}
		i = skipSpace(b, i)
		if i >= len(b) {
			return -1
		}
		if b[i] == '}' {
			return i + 1
		}
		if b[i] != ',' {
			return -1
		}
		i = skipSpace(b, i+1)
	}
}

// skipString: b[i] is an opening quote; the index after the closing one (-1: none, a raw
// control character inside, or an invalid escape), and whether the string holds an escape.
func skipString(b []byte, i int) (int, bool) {
	escaped := false
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1, escaped
		case c == '\\':
			escaped = true
			if i+1 >= len(b) {
				return -1, false
			}
			i++
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) || !isHex(b[i+1]) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) {
					return -1, false
				}
				i += 4
			default:
				return -1, false
			}
		case c < 0x20:
			return -1, false
		}
	}
	return -1, false
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func literal(b []byte, i int, word string) int {
	if len(b)-i < len(word) || string(b[i:i+len(word)]) != word {
		return -1
	}
	return i + len(word)
}

// skipNumber: the index after the JSON number at b[i] (-1: not one).
func skipNumber(b []byte, i int) int {
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || !isDigit(b[i]) {
			return -1
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			return -1
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	return i
}
