/*
 * Fast path of the ingest stream: scan many JSON records of one tensor dataset
 * in one call (loaded with ctypes by services/ingest/fastscan.py).
 *
 * A record is accepted only when it is plainly valid:
 *
 *   {"dataset": "<name>", "id": "<non-empty>", "features": [n1, ..., nK], "label": "<one of labels>", ...}
 *
 * with K == size, every feature a finite JSON number, strings ASCII without
 * escapes, no key given twice, no "text" key, other keys holding any valid
 * JSON value, nothing after the object. Anything else is left "undecided"
 * (status 1) for the careful Python path, which names the precise reason; a
 * record of another dataset gets status 2. The scan never rejects a record by
 * itself, so it can only make the stream faster, never change a verdict.
 *
 * For accepted records it writes the features in the dataset's dtype (a value
 * that does not fit it leaves the record undecided), the label index, the
 * holdout flag (split hash: FNV-1a 64 of "<dataset>\0<id>" with the murmur3
 * finaliser, as cdl.datasets.unit_hash) and the id (NUL-separated). An id
 * longer than the caller's limit leaves its record undecided, so the ids a
 * scan writes, and the id column built from them, stay bounded whatever a
 * batch holds.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ACCEPTED = 0, UNDECIDED = 1, OTHER_DATASET = 2 };
enum { MAX_DEPTH = 64, MAX_NUMBER_CHARS = 63 };

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} cursor;

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int is_digit(unsigned char ch) { return ch >= '0' && ch <= '9'; }

/* A string without escapes, control characters or non-ASCII bytes; its span. */
static int scan_string(cursor *c, const unsigned char **s, int64_t *len) {
    if (c->p >= c->end || *c->p != '"') return -1;
    const unsigned char *start = ++c->p;
    while (c->p < c->end) {
        unsigned char ch = *c->p;
        if (ch == '"') {
            *s = start;
            *len = c->p - start;
            c->p++;
            return 0;
        }
        if (ch == '\\' || ch < 0x20 || ch >= 0x80) return -1;
        c->p++;
    }
    return -1;
}

/* A JSON number (strict grammar) as a finite double. */
static inline __attribute__((always_inline)) int scan_number(cursor *c, double *out) {
    const unsigned char *p = c->p, *end = c->end, *start = c->p;
    int neg = 0, digits = 0, inexact = 0, plain_int = 1;
    uint64_t m = 0;
    int64_t exp10 = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end) return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && is_digit(*p)) {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                digits++;
            } else {
                exp10++;
                inexact = 1;
            }
            p++;
        }
    } else {
        return -1;
    }
    if (p < end && *p == '.') {
        plain_int = 0;
        p++;
        if (p >= end || !is_digit(*p)) return -1;
        while (p < end && is_digit(*p)) {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                digits++;
                exp10--;
            } else if (*p != '0') {
                inexact = 1;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        plain_int = 0;
        p++;
        int eneg = 0;
        int64_t e = 0;
        if (p < end && (*p == '+' || *p == '-')) {
            eneg = *p == '-';
            p++;
        }
        if (p >= end || !is_digit(*p)) return -1;
        while (p < end && is_digit(*p)) {
            if (e < 100000) e = e * 10 + (*p - '0');
            p++;
        }
        exp10 += eneg ? -e : e;
    }
    double d;
    if (plain_int && m == 0) {
        d = 0.0; /* "-0" is the integer 0 */
    } else if (!inexact && m <= (UINT64_C(1) << 53) && exp10 >= -22 && exp10 <= 22) {
        while (exp10 < 0 && m % 10 == 0) { /* "13.0" is 13: no division */
            m /= 10;
            exp10++;
        }
        d = (double)m; /* exact operands: one correctly rounded operation (Clinger's fast path) */
        if (exp10 < 0) {
            d /= POW10[-exp10];
        } else if (exp10 > 0) {
            d *= POW10[exp10]; /* at most 2^53 * 1e22: finite */
        }
        if (neg) d = -d;
    } else {
        char tmp[MAX_NUMBER_CHARS + 1];
        size_t n = (size_t)(p - start);
        if (n > MAX_NUMBER_CHARS) return -1;
        memcpy(tmp, start, n);
        tmp[n] = '\0';
        d = strtod(tmp, NULL);
        if (!isfinite(d)) return -1;
    }
    *out = d;
    c->p = p;
    return 0;
}

static int skip_value(cursor *c, int depth);

/* After an item of an array or object: 1 after a comma (another item follows),
 * 0 after the closing bracket, -1 for anything else. */
static inline __attribute__((always_inline)) int next_item(cursor *c, unsigned char close) {
    skip_ws(c);
    if (c->p >= c->end) return -1;
    if (*c->p == ',') {
        c->p++;
        skip_ws(c);
        return 1;
    }
    if (*c->p == close) {
        c->p++;
        return 0;
    }
    return -1;
}

static int skip_literal(cursor *c, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0) return -1;
    c->p += n;
    return 0;
}

static int skip_container(cursor *c, int depth, unsigned char close, int object) {
    c->p++; /* the opening bracket */
    skip_ws(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    for (;;) {
        if (object) {
            const unsigned char *s;
            int64_t len;
            if (scan_string(c, &s, &len) != 0) return -1;
            skip_ws(c);
            if (c->p >= c->end || *c->p != ':') return -1;
            c->p++;
            skip_ws(c);
        }
        if (skip_value(c, depth + 1) != 0) return -1;
        int more = next_item(c, close);
        if (more <= 0) return more;
    }
}

/* Any JSON value, validated, not kept. */
static int skip_value(cursor *c, int depth) {
    if (depth > MAX_DEPTH || c->p >= c->end) return -1;
    const unsigned char *s;
    int64_t len;
    double d;
    switch (*c->p) {
        case '"':
            return scan_string(c, &s, &len);
        case '{':
            return skip_container(c, depth, '}', 1);
        case '[':
            return skip_container(c, depth, ']', 0);
        case 't':
            return skip_literal(c, "true");
        case 'f':
            return skip_literal(c, "false");
        case 'n':
            return skip_literal(c, "null");
        default:
            return scan_number(c, &d);
    }
}

/* A flat array of exactly `size` numbers into `row`. */
static int scan_features(cursor *c, int64_t size, double *row) {
    if (c->p >= c->end || *c->p != '[') return -1;
    c->p++;
    skip_ws(c);
    int64_t k = 0;
    if (c->p < c->end && *c->p == ']') {
        c->p++;
        return size == 0 ? 0 : -1;
    }
    for (;;) {
        if (k >= size) return -1;
        if (scan_number(c, &row[k]) != 0) return -1;
        k++;
        int more = next_item(c, ']');
        if (more < 0) return -1;
        if (more == 0) return k == size ? 0 : -1;
    }
}

/*
 * The common case of the features array, without a bounds check per character:
 * "[" then `size` numbers -?(0|[1-9][0-9]*)(.[0-9]+)? of at most 15 digits,
 * separated by "," and spaces, then "]". It relies on the byte after the batch
 * buffer being NUL (a Python bytes object always ends so): every loop stops at
 * a byte that cannot continue a number, so it may look past the record's end
 * but never past the buffer, and the array must end within the record. On any
 * other shape it returns -1 without moving the cursor, and scan_features
 * decides. A 15-digit mantissa (< 2^53) divided by 10^k (k <= 15) is one
 * correctly rounded operation on exact operands, the value scan_number gives.
 */
static inline __attribute__((always_inline)) int fast_number(const unsigned char **pp, double *out) {
    const unsigned char *p = *pp;
    int neg = 0, nd = 1, frac = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    unsigned d = (unsigned)*p - '0';
    if (d > 9) return -1;
    uint64_t m = d;
    p++;
    if (d == 0) {
        if ((unsigned)*p - '0' <= 9) return -1; /* a leading zero */
    } else {
        while ((d = (unsigned)*p - '0') <= 9) {
            if (++nd > 15) return -1;
            m = m * 10 + d;
            p++;
        }
    }
    if (*p == '.') {
        p++;
        while ((d = (unsigned)*p - '0') <= 9) {
            if (++nd > 15) return -1;
            m = m * 10 + d;
            frac++;
            p++;
        }
        if (frac == 0) return -1;
    }
    if ((*p | 0x20) == 'e') return -1; /* exponents: the general path */
    double v = (double)m;
    if (frac) v /= POW10[frac];
    if (neg && (frac || m)) v = -v; /* "-0" is the integer 0, "-0.0" the float -0.0 */
    *out = v;
    *pp = p;
    return 0;
}

static int scan_features_fast(cursor *c, int64_t size, double *row) {
    const unsigned char *p = c->p;
    if (*p != '[' || size <= 0) return -1;
    p++;
    while (*p == ' ') p++;
    for (int64_t k = 0;;) {
        if (fast_number(&p, &row[k]) != 0) return -1;
        while (*p == ' ') p++;
        if (++k == size) break;
        if (*p != ',') return -1;
        p++;
        while (*p == ' ') p++;
    }
    if (*p != ']' || p >= c->end) return -1;
    c->p = p + 1;
    return 0;
}

static int key_is(const unsigned char *s, int64_t len, const char *name) {
    return (size_t)len == strlen(name) && memcmp(s, name, (size_t)len) == 0;
}

static double unit_hash(const char *dataset, int64_t dataset_len, const unsigned char *id, int64_t id_len) {
    uint64_t h = UINT64_C(0xCBF29CE484222325);
    const uint64_t prime = UINT64_C(0x100000001B3);
    for (int64_t i = 0; i < dataset_len; i++) h = (h ^ (unsigned char)dataset[i]) * prime;
    h = (h ^ 0) * prime;
    for (int64_t i = 0; i < id_len; i++) h = (h ^ id[i]) * prime;
    h ^= h >> 33;
    h *= UINT64_C(0xFF51AFD7ED558CCD);
    h ^= h >> 33;
    h *= UINT64_C(0xC4CEB9FE1A85EC53);
    h ^= h >> 33;
    return (double)(h >> 11) / 9007199254740992.0; /* 2**53 */
}

/* One record: ACCEPTED (outputs written), UNDECIDED or OTHER_DATASET (with its span). */
static int scan_record(cursor *c, const char *dataset, int64_t dataset_len, const char *labels,
                       const int64_t *label_bounds, int64_t n_labels, int64_t size, int64_t max_id_len, double *row,
                       int32_t *label_out, const unsigned char **id, int64_t *id_len, const unsigned char **ds,
                       int64_t *ds_len) {
    int have_ds = 0, have_id = 0, have_features = 0, have_label = 0;
    int32_t label = -1;
    skip_ws(c);
    if (c->p >= c->end || *c->p != '{') return UNDECIDED;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') return UNDECIDED;
    for (;;) {
        const unsigned char *key;
        int64_t klen;
        if (scan_string(c, &key, &klen) != 0) return UNDECIDED;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':') return UNDECIDED;
        c->p++;
        skip_ws(c);
        if (key_is(key, klen, "dataset")) {
            if (have_ds || scan_string(c, ds, ds_len) != 0) return UNDECIDED;
            have_ds = 1;
            if (*ds_len == 0) return UNDECIDED;
            if (*ds_len != dataset_len || memcmp(*ds, dataset, (size_t)dataset_len) != 0) return OTHER_DATASET;
        } else if (key_is(key, klen, "id")) {
            if (have_id || scan_string(c, id, id_len) != 0 || *id_len == 0 || *id_len > max_id_len) return UNDECIDED;
            have_id = 1;
        } else if (key_is(key, klen, "features")) {
            if (have_features) return UNDECIDED;
            if (scan_features_fast(c, size, row) != 0 && scan_features(c, size, row) != 0) return UNDECIDED;
            have_features = 1;
        } else if (key_is(key, klen, "label")) {
            const unsigned char *s;
            int64_t len;
            if (have_label || scan_string(c, &s, &len) != 0) return UNDECIDED;
            have_label = 1;
            for (int64_t j = 0; j < n_labels; j++) {
                int64_t lo = label_bounds[j], n = label_bounds[j + 1] - lo;
                if (n == len && memcmp(labels + lo, s, (size_t)len) == 0) {
                    label = (int32_t)j;
                    break;
                }
            }
            if (label < 0) return UNDECIDED;
        } else if (key_is(key, klen, "text")) {
            return UNDECIDED;
        } else if (skip_value(c, 1) != 0) {
            return UNDECIDED;
        }
        int more = next_item(c, '}');
        if (more < 0) return UNDECIDED;
        if (more == 0) break;
    }
    skip_ws(c);
    if (c->p != c->end) return UNDECIDED;
    if (!(have_ds && have_id && have_features && have_label)) return UNDECIDED;
    *label_out = label;
    return ACCEPTED;
}

/* dtype codes shared with fastscan.py */
enum { DT_FLOAT32 = 0, DT_FLOAT64 = 1, DT_UINT8 = 2, DT_INT64 = 3 };

/* The row in the dataset's dtype at out[k]; 0 when a value does not fit it (the careful path decides). */
static int store_row(const double *row, int64_t size, int dtype, void *out, int64_t k) {
    switch (dtype) {
        case DT_FLOAT32: {
            float *o = (float *)out + k * size;
            int finite = 1; /* no early exit: the loop vectorises */
            for (int64_t i = 0; i < size; i++) {
                o[i] = (float)row[i];
                finite &= fabsf(o[i]) <= FLT_MAX; /* false for an overflow to infinity */
            }
            return finite;
        }
        case DT_FLOAT64:
            memcpy((double *)out + k * size, row, (size_t)size * sizeof(double));
            return 1;
        case DT_UINT8: {
            uint8_t *o = (uint8_t *)out + k * size;
            int fits = 1; /* no early exit: the loop vectorises */
            for (int64_t i = 0; i < size; i++) {
                double c = row[i] < 0.0 ? 0.0 : (row[i] > 255.0 ? 255.0 : row[i]); /* NaN never gets here */
                int v = (int)c;
                fits &= (c == row[i]) & ((double)v == c); /* in range and whole */
                o[i] = (uint8_t)v;
            }
            return fits;
        }
        case DT_INT64: {
            int64_t *o = (int64_t *)out + k * size;
            for (int64_t i = 0; i < size; i++) {
                if (!(row[i] >= -9223372036854775808.0 && row[i] < 9223372036854775808.0 && row[i] == floor(row[i])))
                    return 0;
                o[i] = (int64_t)row[i];
            }
            return 1;
        }
        default:
            return 0;
    }
}

/*
 * Scan the records `which[0..n)` of `buf` (record r spans bounds[r]..bounds[r+1])
 * as records of `dataset`, whose features are `size` values of `dtype`; a record
 * whose id is longer than `max_id_len` bytes is left undecided.
 * Per scanned record k: status[k]; for another dataset, ds_span[2k], ds_span[2k+1]
 * hold that dataset's offset and length in buf. Accepted records are written
 * compactly, in order: row j of x_out (dtype), label_out[j], holdout_out[j] (1 when
 * the split hash is below holdout_fraction) and the id appended to ids_out
 * (NUL-terminated; *ids_used says how many bytes; ids_out must hold the smaller of
 * the scanned records' total length and n * (max_id_len + 1), plus one). Returns
 * the number accepted, or -1 when memory ran out.
 */
int64_t cdl_scan_json(const unsigned char *buf, const int64_t *bounds, const int64_t *which, int64_t n,
                      const char *dataset, int64_t dataset_len, const char *labels, const int64_t *label_bounds,
                      int64_t n_labels, int64_t size, int dtype, double holdout_fraction, int64_t max_id_len, void *x_out,
                      int32_t *label_out, uint8_t *holdout_out, char *ids_out, int64_t *ids_used, int8_t *status,
                      int64_t *ds_span) {
    double *row = malloc((size_t)(size > 0 ? size : 1) * sizeof(double));
    if (row == NULL) return -1;
    int64_t accepted = 0;
    char *ids = ids_out;
    for (int64_t k = 0; k < n; k++) {
        int64_t r = which[k];
        cursor c = {buf + bounds[r], buf + bounds[r + 1]};
        const unsigned char *id = NULL, *ds = NULL;
        int64_t id_len = 0, ds_len = 0;
        int32_t label = -1;
        int st = scan_record(&c, dataset, dataset_len, labels, label_bounds, n_labels, size, max_id_len, row, &label,
                             &id, &id_len, &ds, &ds_len);
        if (st == ACCEPTED && !store_row(row, size, dtype, x_out, accepted)) st = UNDECIDED;
        status[k] = (int8_t)st;
        if (st == OTHER_DATASET) {
            ds_span[2 * k] = ds - buf;
            ds_span[2 * k + 1] = ds_len;
        } else if (st == ACCEPTED) {
            label_out[accepted] = label;
            holdout_out[accepted] = unit_hash(dataset, dataset_len, id, id_len) < holdout_fraction;
            memcpy(ids, id, (size_t)id_len);
            ids += id_len;
            *ids++ = '\0';
            accepted++;
        }
    }
    free(row);
    *ids_used = ids - ids_out;
    return accepted;
}

/*
 * The ids of a scan (ASCII, from cdl_scan_json's ids_out) as a fixed-width
 * UCS-4 column out[n][width] (what numpy's "<U{width}" holds): id k is
 * blob[starts[k]..starts[k]+lengths[k]), zero-padded. Nothing but the column
 * is allocated, however the lengths vary.
 */
void cdl_ids_ucs4(const unsigned char *blob, const int64_t *starts, const int64_t *lengths, int64_t n, int64_t width,
                  uint32_t *out) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t *o = out + k * width;
        const unsigned char *s = blob + starts[k];
        int64_t len = lengths[k] < width ? lengths[k] : width;
        for (int64_t i = 0; i < len; i++) o[i] = s[i];
        for (int64_t i = len; i < width; i++) o[i] = 0;
    }
}

/*
 * The ids a dataset has taken: an open-addressing hash set over an arena of id
 * bytes (about 30 bytes per id, where a Python set of str takes over 100).
 * Filled in stream order by the processor's thread only, so the first of two
 * records with one id is the one kept, whichever path took it.
 */
typedef struct {
    uint64_t hash; /* never 0; 0 marks an empty slot */
    int64_t at;    /* arena offset of the id: <int32 length><bytes> */
} id_slot;

typedef struct {
    id_slot *slots;
    int64_t cap, count; /* cap: a power of two */
    unsigned char *arena;
    int64_t arena_len, arena_cap;
} idset;

static uint64_t id_hash(const unsigned char *s, int64_t n) {
    uint64_t h = UINT64_C(0xCBF29CE484222325);
    for (int64_t i = 0; i < n; i++) h = (h ^ s[i]) * UINT64_C(0x100000001B3);
    h ^= h >> 33;
    h *= UINT64_C(0xFF51AFD7ED558CCD);
    h ^= h >> 33;
    return h | 1;
}

idset *cdl_idset_new(void) { return calloc(1, sizeof(idset)); }

void cdl_idset_free(idset *s) {
    if (s == NULL) return;
    free(s->slots);
    free(s->arena);
    free(s);
}

int64_t cdl_idset_len(const idset *s) { return s->count; }

static int id_equal(const idset *s, int64_t at, const unsigned char *id, int64_t n) {
    int32_t len;
    memcpy(&len, s->arena + at, 4);
    return len == n && memcmp(s->arena + at + 4, id, (size_t)n) == 0;
}

static int64_t find_slot(const idset *s, uint64_t h, const unsigned char *id, int64_t n, int *found) {
    int64_t mask = s->cap - 1, i = (int64_t)(h & (uint64_t)mask);
    for (;;) {
        if (s->slots[i].hash == 0) {
            *found = 0;
            return i;
        }
        if (s->slots[i].hash == h && id_equal(s, s->slots[i].at, id, n)) {
            *found = 1;
            return i;
        }
        i = (i + 1) & mask;
    }
}

/* Room for `more` ids at a load of at most 3/4. */
static int reserve(idset *s, int64_t more) {
    int64_t cap = s->cap ? s->cap : 1024;
    while ((s->count + more) * 4 > cap * 3) cap *= 2;
    if (cap == s->cap) return 0;
    id_slot *slots = calloc((size_t)cap, sizeof(id_slot));
    if (slots == NULL) return -1;
    for (int64_t i = 0; i < s->cap; i++) {
        if (s->slots[i].hash == 0) continue;
        int64_t j = (int64_t)(s->slots[i].hash & (uint64_t)(cap - 1));
        while (slots[j].hash != 0) j = (j + 1) & (cap - 1);
        slots[j] = s->slots[i];
    }
    free(s->slots);
    s->slots = slots;
    s->cap = cap;
    return 0;
}

/* 1 when the id is in the set. */
int cdl_idset_contains(const idset *s, const unsigned char *id, int64_t n) {
    if (s->count == 0) return 0;
    int found;
    find_slot(s, id_hash(id, n), id, n, &found);
    return found;
}

/*
 * Add the ids buf[starts[k]..starts[k]+lengths[k]) in order; fresh[k] = 1 when
 * id k was not in the set before (it is now), 0 when it was (also when an
 * earlier id of the same call was the same). The table is far larger than the
 * caches, so every id costs a miss: hashes are computed first and each slot is
 * prefetched a few ids ahead. Returns how many were fresh, or -1 when memory
 * ran out (the set then holds the ids before k).
 */
int64_t cdl_idset_add_many(idset *s, const unsigned char *buf, const int64_t *starts, const int64_t *lengths, int64_t n,
                           uint8_t *fresh) {
    if (reserve(s, n) != 0) return -1;
    uint64_t *hashes = malloc((size_t)(n > 0 ? n : 1) * sizeof(uint64_t));
    if (hashes == NULL) return -1;
    int64_t total = 0;
    for (int64_t k = 0; k < n; k++) {
        if (lengths[k] > INT32_MAX) {
            free(hashes);
            return -1;
        }
        hashes[k] = id_hash(buf + starts[k], lengths[k]);
        total += 4 + lengths[k];
    }
    if (s->arena_len + total > s->arena_cap) {
        int64_t cap = s->arena_cap ? s->arena_cap : 1 << 20;
        while (cap < s->arena_len + total) cap *= 2;
        unsigned char *arena = realloc(s->arena, (size_t)cap);
        if (arena == NULL) {
            free(hashes);
            return -1;
        }
        s->arena = arena;
        s->arena_cap = cap;
    }
    const int64_t ahead = 16, mask = s->cap - 1;
    int64_t added = 0;
    for (int64_t k = 0; k < n; k++) {
        if (k + ahead < n) __builtin_prefetch(&s->slots[hashes[k + ahead] & (uint64_t)mask], 1);
        const unsigned char *id = buf + starts[k];
        int64_t len = lengths[k];
        int found;
        int64_t i = find_slot(s, hashes[k], id, len, &found);
        fresh[k] = (uint8_t)!found;
        if (found) continue;
        int32_t len32 = (int32_t)len;
        memcpy(s->arena + s->arena_len, &len32, 4);
        memcpy(s->arena + s->arena_len + 4, id, (size_t)len);
        s->slots[i].hash = hashes[k];
        s->slots[i].at = s->arena_len;
        s->arena_len += 4 + len;
        s->count++;
        added++;
    }
    free(hashes);
    return added;
}
