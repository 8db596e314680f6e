/*
 * pgfleet guest init: PID 1 of every Postgres microVM.
 *
 * Compiled statically at image build time, so the root filesystem needs no shell and no
 * tools. It mounts the pseudo filesystems and the data disk, starts the postmaster as the
 * unprivileged owner of the data directory, and then serves a tiny root-only control port
 * that the host uses after every snapshot restore. A connection carries any number of
 * commands, each answered with one line, "ok\n" or "err <text>\n":
 *
 *   'R' + int64 sec + int64 nsec + 64 random bytes  -> set the clock, add entropy, reseed CRNG
 *   'A'                                             -> open an admin session (see below)
 *   'Q' + uint32 length + SQL                       -> run SQL in the admin session
 *   'X'                                             -> close the admin session
 *   'H'                                             -> fast-shutdown Postgres, unmount, power off
 *
 * The admin session is a superuser connection over the guest's unix socket, opened while the
 * template is made, so it is part of every clone's snapshot: personalising a clone then costs
 * one round trip instead of a TCP handshake plus a backend fork (slow under emulation).
 * Only the host can reach the guest (each VM sits alone in its own network namespace), and
 * init answers only peers whose address is the host's (10.0.0.1), which no process inside
 * the guest can bind: tenants cannot use the port even from inside.
 * Networking itself is configured by the kernel (`ip=` on the command line).
 * When the postmaster dies, init syncs, unmounts and reboots; QEMU runs with -no-reboot
 * and the kernel with reboot=t, so that ends QEMU and the host sees the VM exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PGDATA "/data/pgdata"
#define POSTGRES "/usr/lib/postgresql/15/bin/postgres"
#define DATA_DEV "/dev/vdb"
#define CONTROL_PORT 7
#define HOST_ADDR 0x0a000001 /* 10.0.0.1 */
#define MAX_CLIENTS 8
#define PG_SOCKET "/tmp/.s.PGSQL.5432"
#ifndef REPORTING_ORDER
#define REPORTING_ORDER "5" /* 128 KB blocks; reporting starts with 4 MB free */
#endif
#ifndef READ_AHEAD_KB
#define READ_AHEAD_KB "0" /* measured: 8 MB less guest memory per VM than the default 128 */
#endif

static volatile sig_atomic_t got_child;
static pid_t postmaster;
static int admin_fd = -1; /* the admin session's unix socket, or -1 */

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(2, buf, n);
    (void)w;
}

static void power_off(const char *why) {
    say("pgfleet-init: %s; powering off", why);
    sync();
    if (umount2("/data", 0) != 0) mount(NULL, "/data", NULL, MS_REMOUNT | MS_RDONLY, NULL);
    sync();
    /* reboot=t + QEMU -no-reboot: a reboot ends QEMU; ACPI poweroff does not exist here. */
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}

static void on_sigchld(int sig) {
    (void)sig;
    got_child = 1;
}

/* Reap every exited child (orphans are re-parented to us); note when the postmaster is gone. */
static int reap(void) {
    int status, postmaster_gone = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == postmaster) {
            say("pgfleet-init: postmaster exited (status 0x%x)", status);
            postmaster_gone = 1;
        }
    }
    return postmaster_gone;
}

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags,
                         const char *opts) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, opts) != 0 && errno != EBUSY) {
        char why[256];
        snprintf(why, sizeof why, "mount %s on %s failed: %s", src, dst, strerror(errno));
        power_off(why);
    }
}

/*
 * A template boot (kernel cmdline "pgfleet.template") runs with the clock two hours back.
 * Why: the postmaster draws cancel keys from its own OpenSSL DRBG, which every clone of the
 * snapshot inherits, so clones would hand out identical keys. OpenSSL reseeds a DRBG from
 * the kernel when its last seeding is over an hour old by the wall clock; after a restore the
 * host sets the real time (and reseeds the kernel CRNG) first, so each clone's postmaster
 * reseeds on its first key. Template timestamps (start time, first checkpoint) are hours
 * off, which nobody can tell from "made earlier" anyway.
 */
static void template_clock_skew(void) {
    char buf[1024] = "";
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    if (!strstr(buf, "pgfleet.template")) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec -= 2 * 3600;
    clock_settime(CLOCK_REALTIME, &ts);
}

static pid_t start_postgres(void) {
    struct stat st;
    if (stat(PGDATA, &st) != 0) power_off("no " PGDATA " on the data disk");
    /* A postmaster.pid from before a crash or snapshot names a pid that may now be ours. */
    unlink(PGDATA "/postmaster.pid");
    pid_t pid = fork();
    if (pid < 0) power_off("fork failed");
    if (pid > 0) return pid;
    setsid();
    /* Drop root for good: the data directory's owner is the postgres uid. */
    if (setgroups(0, NULL) != 0 || setgid(st.st_gid) != 0 || setuid(st.st_uid) != 0) {
        say("pgfleet-init: cannot drop privileges: %s", strerror(errno));
        _exit(1);
    }
    if (chdir(PGDATA) != 0) _exit(1);
    umask(077);
    char *argv[] = {"postgres", "-D", PGDATA, NULL};
    char *envp[] = {"PATH=/usr/lib/postgresql/15/bin", "LANG=C.UTF-8", "PGDATA=" PGDATA,
                    "HOME=/tmp", NULL};
    execve(POSTGRES, argv, envp);
    say("pgfleet-init: exec postgres failed: %s", strerror(errno));
    _exit(1);
}

static int read_full(int fd, void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        got += n;
    }
    return 0;
}

static void reply(int fd, const char *text) {
    ssize_t w = write(fd, text, strlen(text));
    (void)w;
}

static void cmd_reseed(int fd) {
    struct {
        int64_t sec, nsec;
        unsigned char entropy[64];
    } __attribute__((packed)) msg;
    if (read_full(fd, &msg, sizeof msg) != 0) return reply(fd, "err short\n");
    struct timespec ts = {.tv_sec = msg.sec, .tv_nsec = msg.nsec};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0) return reply(fd, "err clock\n");
    struct {
        struct rand_pool_info info;
        unsigned char buf[64];
    } pool;
    pool.info.entropy_count = 8 * sizeof msg.entropy;
    pool.info.buf_size = sizeof msg.entropy;
    memcpy(pool.buf, msg.entropy, sizeof msg.entropy);
    int rnd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (rnd < 0) return reply(fd, "err urandom\n");
    /* Clones share the template's RNG state: mix in host randomness and force a reseed now
       rather than at the next scheduled one, so every new backend gets fresh randomness. */
    int ok = ioctl(rnd, RNDADDENTROPY, &pool) == 0 && ioctl(rnd, RNDRESEEDCRNG) == 0;
    close(rnd);
    reply(fd, ok ? "ok\n" : "err reseed\n");
}

/* ---- a minimal Postgres protocol client for the admin session ---- */

static int write_full(int fd, const void *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, (const char *)buf + done, len - done);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        done += n;
    }
    return 0;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* Read messages until ReadyForQuery; the first error's text goes to err (if any). */
static int pg_until_ready(char *err, size_t errlen) {
    int failed = 0;
    for (;;) {
        unsigned char hdr[5];
        if (read_full(admin_fd, hdr, 5) != 0) return -1;
        uint32_t len = (uint32_t)hdr[1] << 24 | hdr[2] << 16 | hdr[3] << 8 | hdr[4];
        if (len < 4 || len > (1u << 24)) return -1;
        char *body = malloc(len - 4 + 1);
        if (!body) return -1;
        if (read_full(admin_fd, body, len - 4) != 0) { free(body); return -1; }
        body[len - 4] = 0;
        if (hdr[0] == 'E' && !failed) {
            failed = 1;
            snprintf(err, errlen, "postgres error");
            for (char *f = body; f < body + len - 4 && *f; f += strlen(f) + 1)
                if (*f == 'M') { snprintf(err, errlen, "%s", f + 1); break; }
        } else if (hdr[0] == 'R' && len >= 8 && (body[3] != 0 || body[0] | body[1] | body[2])) {
            failed = 1;
            snprintf(err, errlen, "admin session needs a password");
        }
        free(body);
        if (hdr[0] == 'Z') return failed ? 1 : 0;
    }
}

static void admin_close(void) {
    if (admin_fd >= 0) {
        unsigned char term[5] = {'X', 0, 0, 0, 4};
        write_full(admin_fd, term, 5);
        close(admin_fd);
        admin_fd = -1;
    }
}

static void cmd_admin_open(int fd) {
    char err[256] = "";
    admin_close();
    admin_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", PG_SOCKET);
    if (admin_fd < 0 || connect(admin_fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        admin_close();
        return reply(fd, "err cannot reach postgres on its unix socket\n");
    }
    /* template1 (pgfleet.drivers.roles.MAINTENANCE_DATABASE): personalising renames the
     * tenant's database, which a session connected to it could not */
    static const char params[] = "user\0postgres\0database\0template1\0application_name\0pgfleet-init\0";
    unsigned char msg[8 + sizeof params];
    put32(msg, sizeof msg);
    put32(msg + 4, 196608); /* protocol 3.0 */
    memcpy(msg + 8, params, sizeof params);
    if (write_full(admin_fd, msg, sizeof msg) != 0 || pg_until_ready(err, sizeof err) != 0) {
        admin_close();
        char line[300];
        snprintf(line, sizeof line, "err admin session: %s\n", err[0] ? err : "startup failed");
        return reply(fd, line);
    }
    reply(fd, "ok\n");
}

static void cmd_admin_query(int fd) {
    unsigned char lenbuf[4];
    if (read_full(fd, lenbuf, 4) != 0) return reply(fd, "err short\n");
    uint32_t len = lenbuf[0] | lenbuf[1] << 8 | lenbuf[2] << 16 | (uint32_t)lenbuf[3] << 24;
    if (len > (1u << 20)) return reply(fd, "err query too long\n");
    unsigned char *msg = malloc(len + 6);
    if (!msg) return reply(fd, "err out of memory\n");
    if (read_full(fd, msg + 5, len) != 0) { free(msg); return reply(fd, "err short\n"); }
    msg[0] = 'Q';
    put32(msg + 1, len + 5);
    msg[5 + len] = 0;
    if (admin_fd < 0) { free(msg); return reply(fd, "err no admin session\n"); }
    char err[256] = "";
    int rc = write_full(admin_fd, msg, len + 6) == 0 ? pg_until_ready(err, sizeof err) : -1;
    free(msg);
    if (rc < 0) {
        admin_close();
        return reply(fd, "err admin session lost\n");
    }
    if (rc > 0) {
        char line[300];
        for (char *c = err; *c; c++) if (*c == '\n') *c = ' ';
        snprintf(line, sizeof line, "err %s\n", err);
        return reply(fd, line);
    }
    reply(fd, "ok\n");
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_full(fd, text, strlen(text));
    close(fd);
    return rc;
}

static void cmd_halt(int fd) {
    admin_close();
    kill(postmaster, SIGINT); /* fast shutdown: ends sessions, writes a shutdown checkpoint */
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == postmaster || (pid < 0 && errno == ECHILD)) break;
    }
    sync();
    umount2("/data", 0);
    reply(fd, "ok\n");
    close(fd);
    power_off("halt requested");
}

/* One command from a readable connection; nonzero means close it. */
static int serve_one(int fd) {
    unsigned char op;
    if (read_full(fd, &op, 1) != 0) return -1;
    switch (op) {
    case 'R': cmd_reseed(fd); return 0;
    case 'A': cmd_admin_open(fd); return 0;
    case 'Q': cmd_admin_query(fd); return 0;
    case 'X': admin_close(); reply(fd, "ok\n"); return 0;
    case 'H': cmd_halt(fd); return -1;
    default: reply(fd, "err unknown command\n"); return -1;
    }
}

int main(void) {
    if (getpid() != 1) {
        fprintf(stderr, "pgfleet-init must run as PID 1\n");
        return 1;
    }
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL); /* EBUSY if automounted */
    mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    /* The root image is compressed: readahead would decompress (slowly, when emulated) and
       cache pages no process asked for, in every VM's own memory. */
    write_file("/sys/block/vda/queue/read_ahead_kb", READ_AHEAD_KB);
    /* Free page reporting hands freed guest memory back to the host (holes in the RAM
       file), but only in blocks of 2^order pages and only while the zone has 32 such
       blocks free above its watermark. The default order here is 10 (4 MB: 128 MB free
       needed), so a 128 MB guest would never report anything. The balloon driver sets the
       order when it registers, so it is lowered here, after boot, not on the cmdline. */
    write_file("/sys/module/page_reporting/parameters/page_reporting_order", REPORTING_ORDER);
    mount_or_die("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m");
    mount_or_die("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=16m");
    mount_or_die("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m");
    /* noinit_itable: the image was made with lazy_itable_init; zeroing it would cost I/O. */
    mount_or_die(DATA_DEV, "/data", "ext4", MS_NOATIME | MS_NOSUID | MS_NODEV,
                 "noinit_itable,data=ordered");
    sethostname("pgfleet", 7);
    template_clock_skew();

    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld; /* no SA_RESTART: accept() returns EINTR so we reap */
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    postmaster = start_postgres();
    say("pgfleet-init: postmaster %d started", (int)postmaster);

    int srv = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(CONTROL_PORT)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    /* SIGCHLD stays blocked except inside ppoll()/sigsuspend(), so a postmaster death can
       never slip in between checking got_child and going to sleep. */
    sigset_t chld, unblocked;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &unblocked);
    sigdelset(&unblocked, SIGCHLD);
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(srv, 8) != 0) {
        say("pgfleet-init: control port unavailable: %s", strerror(errno));
        for (;;) {
            sigsuspend(&unblocked);
            if (got_child && reap()) power_off("postgres is gone");
            got_child = 0;
        }
    }

    /* Connections may stay open: the host keeps one per VM across suspend/resume (its TCP
       state lives in the snapshot), so a wake's reseed costs no handshake. */
    struct pollfd fds[1 + MAX_CLIENTS];
    int nclients = 0;
    for (;;) {
        if (got_child) {
            got_child = 0;
            if (reap()) power_off("postgres is gone");
        }
        fds[0] = (struct pollfd){.fd = srv, .events = POLLIN};
        if (ppoll(fds, 1 + nclients, NULL, &unblocked) < 0) continue; /* EINTR: SIGCHLD */
        for (int i = 1; i <= nclients; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            if (serve_one(fds[i].fd) != 0) {
                close(fds[i].fd);
                fds[i--] = fds[nclients--]; /* drop it; re-check the one moved here */
            }
        }
        if (!(fds[0].revents & POLLIN)) continue;
        struct sockaddr_in peer;
        socklen_t peerlen = sizeof peer;
        int fd = accept4(srv, (struct sockaddr *)&peer, &peerlen, SOCK_CLOEXEC);
        if (fd < 0) continue;
        if (peer.sin_family != AF_INET || ntohl(peer.sin_addr.s_addr) != HOST_ADDR ||
            nclients == MAX_CLIENTS) {
            close(fd); /* only the host may steer init */
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* A command's arguments follow its byte at once; never wait long for them. */
        struct timeval tv = {.tv_sec = 5};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        fds[++nclients] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
}
