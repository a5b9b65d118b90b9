/*
 * openloop -- a constant-arrival-rate HTTP/1.1 load generator (the wrk2 method).
 *
 * Request i is due at t0 + i / rate, whatever happened to the requests before it.
 * A due request goes out on any idle keep-alive connection; when none is idle it
 * waits, and its latency still counts from the time it was due (no coordinated
 * omission: a stalled server is charged for every request it kept waiting, not
 * only for the one it was answering). One thread, epoll_pwait2 with a timeout to the
 * next due time (nanosecond resolution), N connections, one request in flight per
 * connection (no pipelining).
 *
 * The request is the bench's: POST <path> with "Authorization: Bearer <token>"
 * (tokens read from a file, one a line, walked in a shuffled order seeded by the
 * nonce), a unique "Idempotency-Key: <nonce>-<seq>" and the body {"quantity":1}.
 *
 *   openloop --port P --path /api/v1/sales/S/orders --rate R --duration S
 *            [--host 127.0.0.1] [--connections 64] [--tokens FILE] [--nonce TEXT]
 *            [--timeout-ms 5000]
 *
 * After the duration no request is due any more; those already due are still sent
 * and every answer is awaited up to the timeout. Output: one JSON line on stdout:
 *   offered (the rate asked), achieved (answers received in the window / window),
 *   sent, completed, p50/p90/p99/p999/max in ms (from each request's due time,
 *   sorted array of every latency; an unanswered request counts with the time it
 *   waited, a lower bound), status counts, errors (connect, read, timeout, parse),
 *   max_send_lag_ms (the latest the generator woke up after a request fell due:
 *   its own delay, not the server's), cpu_s (its user+system CPU).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define RBUF 65536
#define WBUF 8192
#define MAX_LINE 4096

enum { IDLE, CONNECTING, BUSY, DEAD };

typedef struct {
    int fd;
    int state;
    int64_t due_ns;     /* the in-flight request's due time */
    int64_t sent_ns;
    char wbuf[WBUF];
    int wlen, woff;
    int want_out;       /* EPOLLOUT armed */
    char rbuf[RBUF];
    int rlen;
} conn_t;

static conn_t *conns;
static int nconns = 64;
static const char *host = "127.0.0.1";
static int port = 0;
static const char *path = "/";
static double rate = 100.0, duration_s = 5.0;
static int64_t timeout_ns = 5000000000LL;
static const char *nonce = "openloop";
static char **tokens;
static size_t ntokens;
static int epfd;
static struct sockaddr_in addr;

static int64_t *lat_ns;     /* one slot per scheduled request */
static size_t lat_n, lat_cap;
static long status_count[600];
static long err_connect, err_read, err_timeout, err_parse;
static long sent, completed, completed_in_window;
static int64_t max_send_lag_ns;
static int64_t t0, t_end;
static uint64_t seq;        /* requests scheduled so far */
static uint64_t next_send;  /* the next due request not yet sent */
static size_t tok_pos;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t due_of(uint64_t i) { return t0 + (int64_t)((double)i * 1e9 / rate); }

static void record(int64_t lat) {
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat_ns = realloc(lat_ns, lat_cap * sizeof *lat_ns);
        if (!lat_ns) { perror("realloc"); exit(2); }
    }
    lat_ns[lat_n++] = lat;
}

static void load_tokens(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); exit(2); }
    char line[MAX_LINE];
    size_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        if (!n) continue;
        line[n] = 0;
        if (ntokens == cap) {
            cap = cap ? cap * 2 : 1024;
            tokens = realloc(tokens, cap * sizeof *tokens);
        }
        tokens[ntokens++] = strdup(line);
    }
    fclose(f);
    /* Fisher-Yates, seeded by the nonce: a buyer repeats only once the pool is used up */
    uint64_t s = 1469598103934665603ULL;
    for (const char *c = nonce; *c; c++) s = (s ^ (unsigned char)*c) * 1099511628211ULL;
    for (size_t i = ntokens; i > 1; i--) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t k = s % i;
        char *t = tokens[i - 1]; tokens[i - 1] = tokens[k]; tokens[k] = t;
    }
}

static void ep(int op, conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0 && op != EPOLL_CTL_DEL) { perror("epoll_ctl"); exit(2); }
}

static void conn_open(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->rlen = c->wlen = c->woff = 0;
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) {
        err_connect++;
        close(c->fd);
        c->fd = -1;
        c->state = DEAD;
        return;
    }
    c->state = CONNECTING;
    c->want_out = 0;
    ep(EPOLL_CTL_ADD, c, EPOLLOUT | EPOLLIN);
}

/* the request in flight on c is lost: count it (its wait is a lower bound), reconnect */
static void conn_fail(conn_t *c, long *counter) {
    if (c->state == BUSY) {
        (*counter)++;
        record(now_ns() - c->due_ns);
    } else if (c->state == CONNECTING) {
        err_connect++;
    }
    ep(EPOLL_CTL_DEL, c, 0);
    close(c->fd);
    c->fd = -1;
    c->state = DEAD;
}

static void try_write(conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (n < 0) {
            if (errno == EAGAIN) {
                if (!c->want_out) { ep(EPOLL_CTL_MOD, c, EPOLLIN | EPOLLOUT); c->want_out = 1; }
                return;
            }
            conn_fail(c, &err_read);
            return;
        }
        c->woff += (int)n;
    }
    if (c->want_out) { ep(EPOLL_CTL_MOD, c, EPOLLIN); c->want_out = 0; }
}

static void send_on(conn_t *c, int64_t due, int64_t now) {
    const char *tok = ntokens ? tokens[tok_pos++ % ntokens] : "";
    static const char body[] = "{\"quantity\":1}";
    int n = snprintf(c->wbuf, WBUF,
                     "POST %s HTTP/1.1\r\nHost: %s:%d\r\n%s%s%sIdempotency-Key: %s-%lu\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     path, host, port, ntokens ? "Authorization: Bearer " : "", tok,
                     ntokens ? "\r\n" : "", nonce, (unsigned long)next_send, sizeof body - 1, body);
    if (n <= 0 || n >= WBUF) { fprintf(stderr, "request too long\n"); exit(2); }
    c->wlen = n;
    c->woff = 0;
    c->rlen = 0;
    c->due_ns = due;
    c->sent_ns = now;
    c->state = BUSY;
    sent++;
    try_write(c);
}

/* send every due request for which a connection is idle */
static void dispatch(void) {
    int64_t now = now_ns();
    int any_idle = 1;
    while (any_idle && next_send < seq) {
        any_idle = 0;
        for (int i = 0; i < nconns && next_send < seq; i++) {
            conn_t *c = &conns[i];
            if (c->state == DEAD && now < t_end + timeout_ns) conn_open(c);
            if (c->state != IDLE) continue;
            any_idle = 1;
            send_on(c, due_of(next_send), now);
            next_send++;
        }
    }
}

/* one complete response in c->rbuf? returns its length, 0 if incomplete, -1 if malformed */
static int parse_response(conn_t *c, int *status) {
    c->rbuf[c->rlen < RBUF ? c->rlen : RBUF - 1] = 0;
    char *hdr_end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (!hdr_end) return c->rlen >= RBUF - 1 ? -1 : 0;
    if (c->rlen < 12 || strncmp(c->rbuf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(c->rbuf + 9);
    long clen = -1;
    for (char *p = c->rbuf; p < hdr_end; p++) {
        if ((*p == '\n') && strncasecmp(p + 1, "content-length:", 15) == 0) {
            clen = strtol(p + 16, NULL, 10);
            break;
        }
    }
    if (clen < 0) return -1; /* the servers under test always send Content-Length */
    long total = (hdr_end - c->rbuf) + 4 + clen;
    if (total > RBUF - 1) return -1;
    return c->rlen >= total ? (int)total : 0;
}

static void on_readable(conn_t *c) {
    int status = 0, len = 0;
    for (;;) {  /* read until a whole response is in (one read, almost always) */
        ssize_t n = read(c->fd, c->rbuf + c->rlen, RBUF - 1 - c->rlen);
        if (n < 0) {
            if (errno == EAGAIN) return;
            conn_fail(c, &err_read);
            return;
        }
        if (n == 0) { conn_fail(c, &err_read); return; }
        c->rlen += (int)n;
        if (c->state != BUSY) {  /* bytes nobody asked for */
            conn_fail(c, &err_parse);
            return;
        }
        len = parse_response(c, &status);
        if (len < 0) { conn_fail(c, &err_parse); return; }
        if (len > 0) break;
    }
    int64_t now = now_ns();
    record(now - c->due_ns);
    completed++;
    if (now <= t_end) completed_in_window++;
    if (status >= 100 && status < 600) status_count[status]++;
    c->state = IDLE;
    c->rlen = 0;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_ms(double p) {
    if (!lat_n) return 0.0;
    size_t idx = (size_t)(p / 100.0 * (double)lat_n + 0.5);
    if (idx > 0) idx--;
    if (idx >= lat_n) idx = lat_n - 1;
    return (double)lat_ns[idx] / 1e6;
}

static void usage(void) {
    fprintf(stderr, "usage: openloop --port P --path PATH --rate R --duration S [--host H] "
                    "[--connections N] [--tokens FILE] [--nonce TEXT] [--timeout-ms MS]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *tokfile = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--duration")) duration_s = atof(v);
        else if (!strcmp(a, "--connections")) nconns = atoi(v);
        else if (!strcmp(a, "--tokens")) tokfile = v;
        else if (!strcmp(a, "--nonce")) nonce = v;
        else if (!strcmp(a, "--timeout-ms")) timeout_ns = (int64_t)(atof(v) * 1e6);
        else usage();
    }
    if (port <= 0 || rate <= 0 || duration_s <= 0 || nconns < 1 || nconns > MAX_CONNS) usage();
    if (tokfile) load_tokens(tokfile);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "bad host %s\n", host); return 2; }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) conn_open(&conns[i]);

    /* wait until the connections are up (or failed) before the clock starts */
    int64_t deadline = now_ns() + 2000000000LL;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < nconns; i++) pending += conns[i].state == CONNECTING;
        if (!pending || now_ns() > deadline) break;
        struct epoll_event evs[256];
        int n = epoll_wait(epfd, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (!c || c->state != CONNECTING) continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err || (evs[k].events & (EPOLLERR | EPOLLHUP))) { conn_fail(c, &err_connect); continue; }
            c->state = IDLE;
            ep(EPOLL_CTL_MOD, c, EPOLLIN);
        }
    }

    t0 = now_ns();
    t_end = t0 + (int64_t)(duration_s * 1e9);
    uint64_t total = (uint64_t)(rate * duration_s);
    struct epoll_event evs[512];
    for (;;) {
        int64_t now = now_ns();
        if (seq < total && due_of(seq) <= now) {
            int64_t lag = now - due_of(seq);  /* how late this wake-up is: the loop's own delay */
            if (lag > max_send_lag_ns) max_send_lag_ns = lag;
        }
        while (seq < total && due_of(seq) <= now) seq++;
        dispatch();
        int busy = 0;
        for (int i = 0; i < nconns; i++) busy += conns[i].state == BUSY;
        if (seq >= total && next_send >= seq && !busy) break;
        if (now > t_end + timeout_ns) break;
        /* time out requests in flight too long */
        for (int i = 0; i < nconns; i++) {
            conn_t *c = &conns[i];
            if (c->state == BUSY && now - c->sent_ns > timeout_ns) conn_fail(c, &err_timeout);
        }
        int64_t wake = seq < total ? due_of(seq) : now + 10000000LL;
        if (wake > now + 10000000LL) wake = now + 10000000LL; /* timeouts checked every 10 ms */
        int64_t wait = wake - now_ns();
        if (wait < 0) wait = 0;
        struct timespec ts = {.tv_sec = wait / 1000000000LL, .tv_nsec = wait % 1000000000LL};
        int n = epoll_pwait2(epfd, evs, 512, &ts, NULL);
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (c->fd < 0) continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || (evs[k].events & (EPOLLERR | EPOLLHUP))) { conn_fail(c, &err_connect); continue; }
                c->state = IDLE;
                ep(EPOLL_CTL_MOD, c, EPOLLIN);
                continue;
            }
            if (evs[k].events & EPOLLOUT) try_write(c);
            if (c->fd >= 0 && (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) on_readable(c);
        }
    }
    /* requests due but never sent (no connection came free in time): counted as timeouts */
    int64_t end = now_ns();
    for (uint64_t i = next_send; i < seq; i++) { record(end - due_of(i)); err_timeout++; }
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == BUSY) { record(end - conns[i].due_ns); err_timeout++; }

    qsort(lat_ns, lat_n, sizeof *lat_ns, cmp64);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("{\"tool\":\"openloop\",\"offered\":%.1f,\"achieved\":%.1f,\"duration_s\":%.3f,"
           "\"scheduled\":%lu,\"sent\":%ld,\"completed\":%ld,\"connections\":%d,"
           "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,\"max_ms\":%.3f,"
           "\"max_send_lag_ms\":%.3f,\"cpu_s\":%.3f,"
           "\"errors\":{\"connect\":%ld,\"read\":%ld,\"timeout\":%ld,\"parse\":%ld},\"status\":{",
           rate, (double)completed_in_window / duration_s, duration_s, (unsigned long)total, sent,
           completed, nconns, pct_ms(50), pct_ms(90), pct_ms(99), pct_ms(99.9),
           lat_n ? (double)lat_ns[lat_n - 1] / 1e6 : 0.0, (double)max_send_lag_ns / 1e6, cpu,
           err_connect, err_read, err_timeout, err_parse);
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (status_count[s]) { printf("%s\"%d\":%ld", first ? "" : ",", s, status_count[s]); first = 0; }
    printf("}}\n");
    return 0;
}
