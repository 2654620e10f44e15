package main

import "unicode/utf8"

// scanJSONID reads what the lane needs of a REST infer request's JSON part (the whole body,
// or its first Inference-Header-Content-Length bytes): whether the top-level object has an
// "id" member, its value, and where a member can be inserted (just after the opening brace).
// Values are skipped, never decoded: strings by their quotes and escapes, objects and arrays
// by their nesting, scalars up to the next delimiter.
//
// It is conservative: ok is false for anything the lane leaves to the Python gateway (which
// gives the client the precise error): not an object, an empty object, a key with an escape
// (it could spell "id"), an "id" that is not a plain string (not a string, or with an escape,
// a control character or invalid UTF-8), more than one "id", unbalanced nesting, anything after the object
// but white space. Where it returns ok on valid JSON, it reads what encoding/json reads.
func scanJSONID(b []byte) (id string, has bool, insertAt int, ok bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return "", false, 0, false
	}
	i++
	insertAt = i
	i = skipSpace(b, i)
	if i < len(b) && b[i] == '}' {
		return "", false, 0, false // no inputs: the Python gateway says so
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return "", false, 0, false
		}
		keyStart := i + 1
		end, escaped := skipString(b, i)
		if end < 0 || escaped {
			return "", false, 0, false
		}
		key := b[keyStart : end-1]
		i = skipSpace(b, end)
		if i >= len(b) || b[i] != ':' {
			return "", false, 0, false
		}
		i = skipSpace(b, i+1)
		if string(key) == "id" {
			if has || i >= len(b) || b[i] != '"' {
				return "", false, 0, false
			}
			vend, vescaped := skipString(b, i)
			if vend < 0 || vescaped || !utf8.Valid(b[i+1:vend-1]) {
				return "", false, 0, false
			}
			id, has = string(b[i+1:vend-1]), true
			i = vend
		} else if i = skipValue(b, i); i < 0 {
			return "", false, 0, false
		}
		i = skipSpace(b, i)
		if i >= len(b) {
			return "", false, 0, false
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			if skipSpace(b, i+1) != len(b) {
				return "", false, 0, false
			}
			return id, has, insertAt, true
		default:
			return "", false, 0, false
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString: b[i] is an opening quote; the index after the closing one (-1: none, or a raw
// control character inside), and whether the string holds an escape.
func skipString(b []byte, i int) (int, bool) {
	escaped := false
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1, escaped
		case c == '\\':
			escaped = true
			i++ // the escaped character (for \uXXXX, the hex digits are plain characters)
		case c < 0x20:
			return -1, false
		}
	}
	return -1, false
}

// maxDepth bounds the nesting skipValue follows (deeper input is left to the Python gateway).
const maxDepth = 64

// skipValue: the index after the value starting at b[i] (-1 where it is not well delimited).
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		end, _ := skipString(b, i)
		return end
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				end, _ := skipString(b, i)
				if end < 0 {
					return -1
				}
				i = end
				continue
			case '{', '[':
				if depth++; depth > maxDepth {
					return -1
				}
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	default: // a number, true, false or null: up to the next delimiter
		start := i
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r', '"', '{', '[', ':':
				if i == start {
					return -1
				}
				return i
			}
			i++
		}
		return -1
	}
}
