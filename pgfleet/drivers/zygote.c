/* pgfleet-zygote: postgres, loaded once, forked for every sandboxed start (zygote.py).
 *
 * Exec'ing postgres costs ~9 ms before its main() runs: the kernel maps it and its 41 shared
 * libraries, and the dynamic linker resolves ~12,000 relocations (BIND_NOW), on every wake.
 * The daemon runs `postgres` once with this library preloaded (LD_PRELOAD, a clean
 * environment, PGFLEET_ZYGOTE_FD naming a SOCK_SEQPACKET socket); its constructor runs before
 * postgres' main and never returns in that process: it serves requests. Each request is the
 * jail's arguments (`-n CGROUP_PROCS... -- UID TMP_MB DIRS... -- POSTGRES ARGS...`, jail.c)
 * with the log's descriptor; the zygote forks a child, answers with its pid and a pidfd (the
 * daemon watches the child through it: it is the zygote's child, not the daemon's), and the
 * child runs jail.c's jail_main exactly as the jail binary does (join cgroups, namespaces,
 * fork PID 1, private root, privileges dropped, seccomp, clean environment), except that its
 * last step calls postgres' own main with the request's arguments instead of exec'ing it.
 * Nothing of the jail is skipped: only the exec and the dynamic linking are.
 *
 * main() never runs as root: the constructor exits the zygote rather than return, and postgres
 * itself refuses root. The postgres process keeps this library mapped (its code only; the
 * constructor has run) and the zygote's libraries' state, initialised as root before the
 * privilege drop with nothing secret in it (no configuration of the daemon's is read), and
 * the zygote's address-space layout (docs/security.md says why that is acceptable).
 */
#define PGFLEET_ZYGOTE
#include "jail.c"

#include <dlfcn.h>
#include <sys/socket.h>

#define ZYGOTE_MAX_REQUEST 65536
#define ZYGOTE_MAX_ARGS 512

extern char **environ;
static int (*postgres_main)(int, char **, char **);

/* The zygote's own argv area (the daemon pads it: zygote.py): the kernel shows it as every
 * forked process' /proc/PID/cmdline, and postgres writes its process titles ("postgres: NAME:
 * checkpointer") over its argv strings. The command's arguments are copied there, as an exec
 * would have laid them out, so that the titles show as they do for an exec'd postgres. */
static char *argv_area;
static size_t argv_area_size;

/* The last step of the jail in a forked start: postgres' main, under the name an exec would
 * have given the process (procscan.py finds postmasters by it). */
static void run_postgres_main(char **argv) {
    int argc = 0;
    size_t size = 0;
    while (argv[argc]) size += strlen(argv[argc++]) + 1;
    if (size <= argv_area_size) { /* else no titles: the request's buffer serves as argv */
        char **moved = calloc(argc + 1, sizeof *moved);
        if (moved == NULL) die("calloc", NULL);
        memset(argv_area, 0, argv_area_size);
        char *p = argv_area;
        for (int i = 0; i < argc; i++) {
            moved[i] = p;
            p = stpcpy(p, argv[i]) + 1;
        }
        argv = moved;
    }
    const char *slash = strrchr(argv[0], '/');
    prctl(PR_SET_NAME, slash ? slash + 1 : argv[0], 0, 0, 0);
    exit(postgres_main(argc, argv, environ));
}

static void reap_children(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

/* One request: fork the child that becomes the instance's jail, send back its pid and pidfd. */
static void serve_one(int sock, char *buf, ssize_t n, int log_fd) {
    char *args[ZYGOTE_MAX_ARGS + 2];
    int argc = 0;
    args[argc++] = "pgfleet-jail";
    for (char *p = buf; p < buf + n && argc < ZYGOTE_MAX_ARGS; p += strlen(p) + 1) args[argc++] = p;
    args[argc] = NULL;
    /* The child waits for a go on this pipe, sent once the daemon has its pid: a start the
     * daemon was not told about (the zygote killed in between, no pidfd) never runs, so the
     * daemon may start it another way without making a twin postmaster. */
    int go[2];
    if (pipe2(go, O_CLOEXEC) != 0) go[0] = go[1] = -1;
    sigset_t chld, old;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &old); /* not reaped before its pidfd exists: no pid reuse */
    pid_t pid = go[0] >= 0 ? fork() : -1;
    if (pid == 0) {
        signal(SIGCHLD, SIG_DFL);
        sigprocmask(SIG_SETMASK, &old, NULL);
        close(go[1]);
        char c;
        ssize_t got;
        while ((got = read(go[0], &c, 1)) < 0 && errno == EINTR) {
        }
        if (got != 1) _exit(0);
        int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (devnull < 0 || setsid() < 0 || dup2(devnull, 0) < 0 || dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
            _exit(111);
        /* nothing of the zygote's (its socket, the libraries' descriptors) reaches the tenant */
        if (syscall(SYS_close_range, 3, ~0U, 0) != 0) _exit(111);
        prctl(PR_SET_NAME, "pgfleet-jail", 0, 0, 0);
        exit(jail_main(argc, args, run_postgres_main));
    }
    int pidfd = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
    sigprocmask(SIG_SETMASK, &old, NULL);
    int32_t reply = pid > 0 && pidfd >= 0 ? pid : -1;
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &reply, .iov_len = sizeof reply};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (pidfd >= 0) {
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &pidfd, sizeof(int));
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) _exit(0); /* the daemon is gone (and with us, the go) */
    if (reply > 0 && write(go[1], "g", 1) != 1) kill(pid, SIGKILL); /* the daemon sees it exit */
    if (go[0] >= 0) close(go[0]);
    if (go[1] >= 0) close(go[1]);
    if (pidfd >= 0) close(pidfd);
}

static void serve(int sock) {
    static char buf[ZYGOTE_MAX_REQUEST];
    for (;;) {
        char control[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf - 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) _exit(0); /* the daemon closed its end (or died) */
        buf[n] = '\0';
        int log_fd = -1;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&log_fd, CMSG_DATA(c), sizeof(int));
        if (log_fd < 0 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            int32_t refused = -1;
            if (log_fd >= 0) close(log_fd);
            if (send(sock, &refused, sizeof refused, MSG_NOSIGNAL) < 0) _exit(0);
            continue;
        }
        serve_one(sock, buf, n, log_fd);
        close(log_fd);
    }
}

/* glibc calls a library's constructors with the program's argc, argv and environment */
__attribute__((constructor)) static void zygote(int argc, char **argv, char **envp) {
    const char *fd = getenv("PGFLEET_ZYGOTE_FD");
    if (fd == NULL || argc < 1) return; /* preloaded by mistake: behave as plain postgres */
    int sock = atoi(fd);
    argv_area = argv[0];
    argv_area_size = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) + 1 - argv[0]);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() == 1) _exit(111);
    postgres_main = (int (*)(int, char **, char **))dlsym(RTLD_DEFAULT, "main");
    if (postgres_main == NULL) _exit(112);
    prctl(PR_SET_NAME, "pgfleet-zygote", 0, 0, 0);
    /* the jail sets its own environment; nothing of this one reaches postgres, not even as the
     * original strings /proc/PID/environ shows */
    for (char **e = envp; *e; e++) memset(*e, 0, strlen(*e));
    clearenv();
    struct sigaction sa = {.sa_handler = reap_children, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGCHLD, &sa, NULL) != 0) _exit(111);
    serve(sock);
}
