/*
 * A Kafka consumer that hands records over by column: one call returns a batch as
 * one buffer of values (plus bounds, partitions, offsets) instead of a Python
 * object per record. Loaded with ctypes by cdl/kafka_native.py and linked against
 * the librdkafka that confluent-kafka ships, so it speaks the same protocol with
 * the same settings; the transactional producer stays confluent-kafka's (it takes
 * this consumer's group metadata as the serialized bytes librdkafka writes).
 *
 * librdkafka's public, stable C API is declared here (its header does not ship
 * with the wheel): opaque handles, and the public structs whose fields we read
 * (rd_kafka_message_t, rd_kafka_topic_partition_t, rd_kafka_topic_partition_list_t),
 * as rdkafka.h declares them in every release from 2.6.0 to 2.16 (checked: the
 * declarations are identical over that range). kafka_native.py checks
 * rd_kafka_version() against that range before building this file and uses
 * confluent-kafka's consumer for any other version.
 *
 * Nothing consumed is dropped silently: consume errors are counted by code for
 * the caller (who logs them and counts them in Prometheus), and where memory
 * runs out mid-batch the whole batch is released and -1 returned, so that the
 * caller raises and recovers from the committed offsets.
 */
#define _POSIX_C_SOURCE 200809L /* strdup, ssize_t */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_queue_s rd_kafka_queue_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_headers_s rd_kafka_headers_t;
typedef struct rd_kafka_error_s rd_kafka_error_t;
typedef struct rd_kafka_consumer_group_metadata_s rd_kafka_consumer_group_metadata_t;
typedef int rd_kafka_resp_err_t;

typedef struct rd_kafka_message_s {
    rd_kafka_resp_err_t err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

typedef struct rd_kafka_topic_partition_s {
    char *topic;
    int32_t partition;
    int64_t offset;
    void *metadata;
    size_t metadata_size;
    void *opaque;
    rd_kafka_resp_err_t err;
    void *_private;
} rd_kafka_topic_partition_t;

typedef struct rd_kafka_topic_partition_list_s {
    int cnt;
    int size;
    rd_kafka_topic_partition_t *elems;
} rd_kafka_topic_partition_list_t;

enum { RD_KAFKA_CONSUMER = 1, RD_KAFKA_CONF_OK = 0 };
enum {
    ERR__ASSIGN_PARTITIONS = -175,
    ERR__PARTITION_EOF = -191,
};

int rd_kafka_version(void);

rd_kafka_conf_t *rd_kafka_conf_new(void);
void rd_kafka_conf_destroy(rd_kafka_conf_t *conf);
int rd_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errstr, size_t errstr_size);
void rd_kafka_conf_set_opaque(rd_kafka_conf_t *conf, void *opaque);
void rd_kafka_conf_set_rebalance_cb(rd_kafka_conf_t *conf,
                                    void (*cb)(rd_kafka_t *, rd_kafka_resp_err_t, rd_kafka_topic_partition_list_t *,
                                               void *));
rd_kafka_t *rd_kafka_new(int type, rd_kafka_conf_t *conf, char *errstr, size_t errstr_size);
void rd_kafka_destroy(rd_kafka_t *rk);
rd_kafka_resp_err_t rd_kafka_poll_set_consumer(rd_kafka_t *rk);
rd_kafka_queue_t *rd_kafka_queue_get_consumer(rd_kafka_t *rk);
void rd_kafka_queue_destroy(rd_kafka_queue_t *rkqu);
ssize_t rd_kafka_consume_batch_queue(rd_kafka_queue_t *rkqu, int timeout_ms, rd_kafka_message_t **rkmessages,
                                     size_t rkmessages_size);
void rd_kafka_message_destroy(rd_kafka_message_t *rkmessage);
const char *rd_kafka_topic_name(const rd_kafka_topic_t *rkt);
rd_kafka_resp_err_t rd_kafka_message_headers(const rd_kafka_message_t *rkmessage, rd_kafka_headers_t **hdrsp);
rd_kafka_resp_err_t rd_kafka_header_get_all(const rd_kafka_headers_t *hdrs, size_t idx, const char **namep,
                                            const void **valuep, size_t *sizep);
rd_kafka_topic_partition_list_t *rd_kafka_topic_partition_list_new(int size);
void rd_kafka_topic_partition_list_destroy(rd_kafka_topic_partition_list_t *rkparlist);
rd_kafka_topic_partition_t *rd_kafka_topic_partition_list_add(rd_kafka_topic_partition_list_t *rktparlist,
                                                              const char *topic, int32_t partition);
rd_kafka_resp_err_t rd_kafka_subscribe(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *topics);
rd_kafka_resp_err_t rd_kafka_assign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
rd_kafka_error_t *rd_kafka_incremental_assign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
rd_kafka_error_t *rd_kafka_incremental_unassign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
const char *rd_kafka_rebalance_protocol(rd_kafka_t *rk);
rd_kafka_resp_err_t rd_kafka_assignment(rd_kafka_t *rk, rd_kafka_topic_partition_list_t **partitions);
rd_kafka_resp_err_t rd_kafka_position(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *partitions);
rd_kafka_resp_err_t rd_kafka_consumer_close(rd_kafka_t *rk);
rd_kafka_consumer_group_metadata_t *rd_kafka_consumer_group_metadata(rd_kafka_t *rk);
void rd_kafka_consumer_group_metadata_destroy(rd_kafka_consumer_group_metadata_t *);
rd_kafka_error_t *rd_kafka_consumer_group_metadata_write(const rd_kafka_consumer_group_metadata_t *cgmd,
                                                         void **bufferp, size_t *sizep);
void rd_kafka_error_destroy(rd_kafka_error_t *error);
const char *rd_kafka_err2str(rd_kafka_resp_err_t err);
const char *rd_kafka_err2name(rd_kafka_resp_err_t err);
void rd_kafka_mem_free(rd_kafka_t *rk, void *ptr);

enum { FLAG_NULL_VALUE = 1, FLAG_KEY = 2, FLAG_HEADERS = 4 };
/* topic indices travel as int16; distinct error codes kept between two cdl_consumer_errors calls */
enum { MAX_TOPIC_NAMES = 32767, MAX_ERROR_CODES = 32, DETAIL_LEN = 512 };

/* the Python side's rebalance hook: 1 = partitions assigned, 0 = about to be revoked */
typedef void (*rebalance_hook)(int assigned);

typedef struct {
    rd_kafka_t *rk;
    rd_kafka_queue_t *queue;
    rebalance_hook hook;
    /* every topic name seen (subscribed, matched by a regex subscription, assigned); a record's
     * and a position's topic is an index into it. It only grows: indices stay valid. */
    char **names;
    int n_names, names_cap;
    rd_kafka_message_t **msgs;
    size_t msgs_cap;
    unsigned char *data, *aux;
    size_t data_cap, aux_cap, data_len, aux_len;
    /* consume errors since the caller last asked: per code, how many; the last one's text */
    rd_kafka_resp_err_t error_codes[MAX_ERROR_CODES];
    int64_t error_counts[MAX_ERROR_CODES];
    int n_error_codes;
    char last_detail[DETAIL_LEN];
    int last_errno;
} consumer;

static void rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts, void *opaque) {
    consumer *c = opaque;
    const char *proto = rd_kafka_rebalance_protocol(rk);
    int cooperative = proto != NULL && strcmp(proto, "COOPERATIVE") == 0;
    rd_kafka_error_t *error = NULL;
    if (err == ERR__ASSIGN_PARTITIONS) {
        if (cooperative)
            error = rd_kafka_incremental_assign(rk, parts);
        else
            rd_kafka_assign(rk, parts);
        if (c->hook) c->hook(1);
    } else {
        /* the hook commits what was consumed while the partitions are still ours */
        if (c->hook) c->hook(0);
        if (cooperative)
            error = rd_kafka_incremental_unassign(rk, parts);
        else
            rd_kafka_assign(rk, NULL);
    }
    if (error) rd_kafka_error_destroy(error);
}

/* The index of topic `name`, added when new; -1 when memory ran out (or the table is full). */
static int topic_index(consumer *c, const char *name) {
    for (int i = c->n_names - 1; i >= 0; i--)
        if (strcmp(c->names[i], name) == 0) return i;
    if (c->n_names >= MAX_TOPIC_NAMES) return -1;
    if (c->n_names == c->names_cap) {
        int cap = c->names_cap ? 2 * c->names_cap : 16;
        char **names = realloc(c->names, (size_t)cap * sizeof(char *));
        if (names == NULL) return -1;
        c->names = names;
        c->names_cap = cap;
    }
    char *copy = strdup(name);
    if (copy == NULL) return -1;
    c->names[c->n_names] = copy;
    return c->n_names++;
}

/* Topic names seen so far (indices 0..n-1 of records and positions). */
int cdl_consumer_topic_count(consumer *c) { return c->n_names; }

const char *cdl_consumer_topic_name(consumer *c, int i) { return i >= 0 && i < c->n_names ? c->names[i] : NULL; }

static void count_error(consumer *c, const rd_kafka_message_t *m) {
    int i = 0;
    while (i < c->n_error_codes && c->error_codes[i] != m->err) i++;
    if (i == c->n_error_codes) {
        if (i == MAX_ERROR_CODES) {
            i--; /* (not expected between two calls) counted with the last code kept */
        } else {
            c->error_codes[i] = m->err;
            c->error_counts[i] = 0;
            c->n_error_codes++;
        }
    }
    c->error_counts[i]++;
    /* an error message's payload, where there is one, is its description (rd_kafka_message_errstr) */
    const char *text = rd_kafka_err2str(m->err);
    size_t len = strlen(text);
    if (m->payload != NULL && m->len > 0) {
        text = m->payload;
        len = m->len;
    }
    if (len >= DETAIL_LEN) len = DETAIL_LEN - 1;
    memcpy(c->last_detail, text, len);
    c->last_detail[len] = '\0';
}

static void *grow(void *p, size_t *cap, size_t need) {
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : 1 << 20;
    while (n < need) n *= 2;
    void *q = realloc(p, n);
    if (q == NULL) return NULL;
    *cap = n;
    return q;
}

/* A consumer with these settings, or NULL with the reason in errstr. */
consumer *cdl_consumer_new(const char **keys, const char **values, int n, rebalance_hook hook, char *errstr,
                           int errlen) {
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    for (int i = 0; i < n; i++) {
        if (rd_kafka_conf_set(conf, keys[i], values[i], errstr, (size_t)errlen) != RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    consumer *c = calloc(1, sizeof(consumer));
    if (c == NULL) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    c->hook = hook;
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_rebalance_cb(conf, rebalance);
    c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, (size_t)errlen); /* owns conf on success */
    if (c->rk == NULL) {
        rd_kafka_conf_destroy(conf);
        free(c);
        return NULL;
    }
    rd_kafka_poll_set_consumer(c->rk);
    c->queue = rd_kafka_queue_get_consumer(c->rk);
    return c;
}

/* Subscribe to `topics`: names, or regular expressions where they start with '^'. */
int cdl_consumer_subscribe(consumer *c, const char **topics, int n) {
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(n);
    if (list == NULL) return -1;
    for (int i = 0; i < n; i++) {
        rd_kafka_topic_partition_list_add(list, topics[i], -1);
        if (topics[i][0] != '^' && topic_index(c, topics[i]) < 0) { /* names first, in order */
            rd_kafka_topic_partition_list_destroy(list);
            return -1;
        }
    }
    rd_kafka_resp_err_t err = rd_kafka_subscribe(c->rk, list);
    rd_kafka_topic_partition_list_destroy(list);
    return err;
}

/* Release messages from..got-1 of the last consume (what a failed copy leaves). */
static void release(consumer *c, ssize_t from, ssize_t got) {
    for (ssize_t i = from; i < got; i++) rd_kafka_message_destroy(c->msgs[i]);
}

/*
 * Up to `max` records, waiting at most `timeout_ms` for the first. Record i:
 * its value is data[bounds[i]..bounds[i+1]) (flags FLAG_NULL_VALUE for none),
 * its key (FLAG_KEY) and headers (FLAG_HEADERS) are in aux at aux_off[i]: the
 * key as <int64 length><bytes>, then the headers as <int64 count> and per header
 * <int64 name length><name><int64 value length, -1 for none><value>; its topic
 * is topic[i], an index of cdl_consumer_topic_name. Errors other than
 * end-of-partition are counted by code (cdl_consumer_errors) and skipped.
 * Returns the number of records; -1 when memory ran out, the whole batch then
 * released: the consumer's positions are past records never handed over, so
 * the caller must not commit them but recover from the committed offsets;
 * -2 when librdkafka failed (errno in cdl_consumer_errno), nothing consumed.
 */
int64_t cdl_consumer_consume(consumer *c, int64_t max, int timeout_ms, int32_t *partitions, int64_t *offsets,
                             int16_t *topic, int64_t *bounds, int64_t *aux_off, int8_t *flags) {
    c->data_len = c->aux_len = 0;
    rd_kafka_message_t **msgs = grow(c->msgs, &c->msgs_cap, (size_t)max * sizeof(rd_kafka_message_t *));
    if (msgs == NULL) return -1; /* nothing consumed yet */
    c->msgs = msgs;
    errno = 0;
    ssize_t got = rd_kafka_consume_batch_queue(c->queue, timeout_ms, c->msgs, (size_t)max);
    if (got < 0) {
        c->last_errno = errno;
        return -2;
    }
    size_t need = 0;
    for (ssize_t i = 0; i < got; i++)
        if (c->msgs[i]->err == 0) need += c->msgs[i]->len;
    unsigned char *data = grow(c->data, &c->data_cap, need + 1);
    if (data == NULL) {
        release(c, 0, got);
        return -1;
    }
    c->data = data;
    /* keys and headers are rare: aux grows as they come (each message's headers are read once) */
    unsigned char *aux = grow(c->aux, &c->aux_cap, 1);
    if (aux == NULL) {
        release(c, 0, got);
        return -1;
    }
    c->aux = aux;
    size_t used = 0, aux_used = 0;
    int64_t n = 0;
    const rd_kafka_topic_t *last_rkt = NULL;
    int last_topic = -1;
    bounds[0] = 0;
    for (ssize_t i = 0; i < got; i++) {
        rd_kafka_message_t *m = c->msgs[i];
        if (m->err != 0) {
            if (m->err != ERR__PARTITION_EOF) count_error(c, m);
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->rkt != last_rkt) {
            last_topic = topic_index(c, rd_kafka_topic_name(m->rkt));
            if (last_topic < 0) {
                release(c, i, got);
                return -1;
            }
            last_rkt = m->rkt;
        }
        int8_t f = 0;
        if (m->payload == NULL) {
            f |= FLAG_NULL_VALUE;
        } else {
            memcpy(data + used, m->payload, m->len);
            used += m->len;
        }
        aux_off[n] = (int64_t)aux_used;
        if (m->key != NULL) {
            if ((aux = grow(c->aux, &c->aux_cap, aux_used + 8 + m->key_len)) == NULL) {
                release(c, i, got);
                return -1;
            }
            c->aux = aux;
            f |= FLAG_KEY;
            int64_t len = (int64_t)m->key_len;
            memcpy(aux + aux_used, &len, 8);
            memcpy(aux + aux_used + 8, m->key, m->key_len);
            aux_used += 8 + m->key_len;
        }
        rd_kafka_headers_t *h = NULL;
        if (rd_kafka_message_headers(m, &h) == 0) {
            const char *name;
            const void *value;
            size_t size;
            size_t count_at = aux_used;
            int64_t count = 0;
            if ((aux = grow(c->aux, &c->aux_cap, aux_used + 8)) == NULL) {
                release(c, i, got);
                return -1;
            }
            c->aux = aux;
            aux_used += 8;
            for (size_t j = 0; rd_kafka_header_get_all(h, j, &name, &value, &size) == 0; j++) {
                int64_t nlen = (int64_t)strlen(name), vlen = value == NULL ? -1 : (int64_t)size;
                if ((aux = grow(c->aux, &c->aux_cap, aux_used + 16 + (size_t)nlen + size)) == NULL) {
                    release(c, i, got);
                    return -1;
                }
                c->aux = aux;
                memcpy(aux + aux_used, &nlen, 8);
                memcpy(aux + aux_used + 8, name, (size_t)nlen);
                aux_used += 8 + (size_t)nlen;
                memcpy(aux + aux_used, &vlen, 8);
                aux_used += 8;
                if (value != NULL) {
                    memcpy(aux + aux_used, value, size);
                    aux_used += size;
                }
                count++;
            }
            memcpy(aux + count_at, &count, 8);
            f |= FLAG_HEADERS;
        }
        partitions[n] = m->partition;
        offsets[n] = m->offset;
        topic[n] = (int16_t)last_topic;
        flags[n] = f;
        bounds[n + 1] = (int64_t)used;
        n++;
        rd_kafka_message_destroy(m);
    }
    c->data_len = used;
    c->aux_len = aux_used;
    return n;
}

/* The last batch's values (and their total length); valid until the next consume. */
const unsigned char *cdl_consumer_data(consumer *c, int64_t *len) {
    *len = (int64_t)c->data_len;
    return c->data;
}

const unsigned char *cdl_consumer_aux(consumer *c, int64_t *len) {
    *len = (int64_t)c->aux_len;
    return c->aux;
}

/*
 * Consume errors since the last call: up to `cap` distinct codes with their
 * counts (how many codes is returned) and the last error's description (valid
 * until the next consume).
 */
int cdl_consumer_errors(consumer *c, int32_t *codes, int64_t *counts, int cap, const char **last) {
    int n = c->n_error_codes < cap ? c->n_error_codes : cap;
    for (int i = 0; i < n; i++) {
        codes[i] = c->error_codes[i];
        counts[i] = c->error_counts[i];
    }
    *last = c->last_detail;
    c->n_error_codes = 0;
    return n;
}

/* errno of the last consume that returned -2. */
int cdl_consumer_errno(consumer *c) { return c->last_errno; }

/* The assigned partitions (topics as cdl_consumer_topic_name indices) with their positions
 * (-1001 when none yet); -1 when they cannot be read. */
int cdl_consumer_positions(consumer *c, int16_t *topic, int32_t *partitions, int64_t *offsets, int cap) {
    rd_kafka_topic_partition_list_t *list = NULL;
    if (rd_kafka_assignment(c->rk, &list) != 0 || list == NULL) return -1;
    rd_kafka_position(c->rk, list);
    int n = 0;
    for (int i = 0; i < list->cnt && n < cap; i++) {
        int t = topic_index(c, list->elems[i].topic);
        if (t < 0) {
            rd_kafka_topic_partition_list_destroy(list);
            return -1;
        }
        topic[n] = (int16_t)t;
        partitions[n] = list->elems[i].partition;
        offsets[n] = list->elems[i].offset;
        n++;
    }
    rd_kafka_topic_partition_list_destroy(list);
    return n;
}

/* The group metadata, serialized as librdkafka writes it (what confluent-kafka's
 * Consumer.consumer_group_metadata() returns); its size, or -1. */
int64_t cdl_consumer_group_metadata(consumer *c, unsigned char *out, int64_t cap) {
    rd_kafka_consumer_group_metadata_t *md = rd_kafka_consumer_group_metadata(c->rk);
    if (md == NULL) return -1;
    void *buf = NULL;
    size_t size = 0;
    rd_kafka_error_t *error = rd_kafka_consumer_group_metadata_write(md, &buf, &size);
    rd_kafka_consumer_group_metadata_destroy(md);
    if (error) {
        rd_kafka_error_destroy(error);
        return -1;
    }
    int64_t n = (int64_t)size <= cap ? (int64_t)size : -1;
    if (n >= 0) memcpy(out, buf, size);
    rd_kafka_mem_free(NULL, buf);
    return n;
}

/* Leave the group (the rebalance hook runs for the revoke) and free everything. */
void cdl_consumer_close(consumer *c) {
    rd_kafka_consumer_close(c->rk);
    rd_kafka_queue_destroy(c->queue);
    rd_kafka_destroy(c->rk);
    for (int i = 0; i < c->n_names; i++) free(c->names[i]);
    free(c->names);
    free(c->msgs);
    free(c->data);
    free(c->aux);
    free(c);
}

const char *cdl_err2str(int err) { return rd_kafka_err2str(err); }

const char *cdl_err2name(int err) { return rd_kafka_err2name(err); }

/* The linked librdkafka's version (0xMMmmrrpp), what its declarations above were checked against. */
int cdl_rdkafka_version(void) { return rd_kafka_version(); }
