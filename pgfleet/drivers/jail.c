/* pgfleet-jail: the last step before a sandboxed database's postgres (or a test's tenant shell)
 * runs. Started by the daemon as root with -n, which joins the instance's cgroups, makes fresh
 * mount/PID/IPC/UTS/network/cgroup namespaces and forks; as PID 1 of them it
 *   1. builds a private root: a read-only tmpfs holding read-only binds of /usr and /etc (and
 *      /bin, /lib... or their merged-usr symlinks), a minimal /dev, a fresh /proc of its PID
 *      namespace, size-limited private /tmp and /dev/shm (tmpfs: charged to the instance's
 *      memory cgroup, gone when its last process exits), and only three host directories:
 *      the data directory (read-write), the socket directory (read-write), the auth directory
 *      (read-only), each at its host path; everything else of the host is out of reach;
 *   2. drops to the instance's uid/gid with no supplementary groups, an empty capability
 *      bounding set, no ambient capabilities, and no_new_privs;
 *   3. installs a seccomp filter refusing (EPERM) the system calls a database never needs and an
 *      escape would: namespaces (unshare, setns, clone with CLONE_NEW*), mount and friends, bpf,
 *      keyctl, ptrace, perf_event_open, process_vm_*, modules, kexec, io_uring, userfaultfd...
 *      clone3 gets ENOSYS (its flags cannot be inspected; libc falls back to clone);
 *   4. execs the command with a clean environment.
 * Any failure exits 111 with one line on stderr; nothing runs half-jailed.
 *
 * usage: pgfleet-jail [-w] UID TMP_MB DATA_DIR SOCKET_DIR AUTH_DIR [WAL_DIR] -- COMMAND [ARG...]
 *        pgfleet-jail -n CGROUP_PROCS_FILE... -- [-w] UID TMP_MB ... (the same)
 * (-n: join the instance's cgroups, make the fresh namespaces and fork (see
 *  join_and_enter_namespaces), then the child jails as above: the daemon's one exec per start)
 *        pgfleet-jail -j CGROUP_PROCS_FILE... -- COMMAND [ARG...]
 * (-j: join the instance's cgroups (write 0 to each cgroup.procs) and exec COMMAND: the microVM
 *  driver's QEMU. -n and -j exist because the daemon must not join cgroups between fork and exec
 *  itself: Python code there forces a full fork() of the daemon (page tables and all, ~10-30 ms
 *  on a wake's critical path), while a plain exec lets it use vfork.)
 * (WAL_DIR: pg_wal's own filesystem, for a database with a disk limit; bound read-write)
 * (-w: wait until the host's root is detached before exec; see detach_old_root)
 * (all directories absolute, canonical paths, as root sees them on the host)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define NEWROOT "/tmp" /* a mount point every host has; the tmpfs there is ours alone */
#define OLDROOT "/.oldroot" /* where the host's root waits for its detach, inside the new root */
#define CAP_LAST_CAP_FALLBACK 63 /* if /proc/sys/kernel/cap_last_cap cannot be read: drop all */

static void die(const char *what, const char *arg) {
    fprintf(stderr, "pgfleet-jail: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(111);
}

static void mkdirs(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) die("path too long", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, mode) != 0 && errno != EEXIST) die("mkdir", buf);
        *p = '/';
    }
    if (mkdir(buf, mode) != 0 && errno != EEXIST) die("mkdir", buf);
}

static void in_root(char *out, const char *path) {
    if (snprintf(out, PATH_MAX, "%s%s", NEWROOT, path) >= PATH_MAX) die("path too long", path);
}

/* Bind `src` (a path, or /proc/self/fd/N) at `dst` inside the new root, then remount it with
 * `flags` (MS_RDONLY, MS_NOSUID, ...): a bind mount takes new flags only on a remount. */
static void bind_mount(const char *src, const char *dst, unsigned long flags, int is_dir) {
    char target[PATH_MAX];
    in_root(target, dst);
    if (is_dir) {
        mkdirs(target, 0755);
    } else {
        int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) die("create", target);
        close(fd);
    }
    if (mount(src, target, NULL, MS_BIND, NULL) != 0) die("bind", dst);
    if (mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | flags, NULL) != 0) die("remount", dst);
}

/* /bin, /lib... : a symlink on merged-/usr hosts (copy the link), else a read-only bind. */
static void system_dir(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return;
    if (S_ISLNK(st.st_mode)) {
        char link[PATH_MAX], target[PATH_MAX];
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n < 0) die("readlink", path);
        link[n] = '\0';
        in_root(target, path);
        if (symlink(link, target) != 0) die("symlink", target);
    } else if (S_ISDIR(st.st_mode)) {
        bind_mount(path, path, MS_RDONLY | MS_NOSUID | MS_NODEV, 1);
    }
}

static void tmpfs(const char *path, const char *opts) {
    char target[PATH_MAX];
    in_root(target, path);
    mkdirs(target, 0755);
    if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0) die("tmpfs", path);
}

/* The instance's own host directories, opened before the new root hides the host. */
struct host_dirs {
    const char *data, *sockets, *auth, *wal; /* wal: NULL, or pg_wal's own filesystem (disk_mb) */
    int data_fd, sockets_fd, auth_fd, wal_fd;
};

static int open_dir(const char *path) {
    if (path[0] != '/') { errno = EINVAL; die("not absolute", path); }
    int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) die("open", path);
    return fd;
}

static void bind_fd(int fd, const char *dst, unsigned long flags) {
    char src[64];
    snprintf(src, sizeof src, "/proc/self/fd/%d", fd);
    bind_mount(src, dst, flags, 1);
    close(fd);
}

/* The data directory's mount, in one place: a read-write bind of whatever the host prepared at
 * that path (a plain directory today; a size-limited filesystem or an overlayfs upper directory
 * is mounted there on the host side, and this bind carries it in unchanged). */
static void mount_data_dir(struct host_dirs *d) {
    bind_fd(d->data_fd, d->data, MS_NOSUID | MS_NODEV);
    if (d->wal) bind_fd(d->wal_fd, d->wal, MS_NOSUID | MS_NODEV | MS_NOEXEC);
}

/* A lazy unmount waits for an RCU grace period (~15 ms measured, far more under load): on a
 * wake's critical path when done inline. A child does it while postgres starts (no tenant code
 * can run that early: a query needs a connection, which needs postgres ready), and exits 0,
 * which postgres' reaper ignores as a child it does not know. `wait` (the tests' tenant shell,
 * which runs at once) waits for it. */
static int detach_child(void *arg) {
    (void)arg;
    if (umount2(OLDROOT, MNT_DETACH) != 0) perror("pgfleet-jail: detach old root");
    return 0; /* exit 0 whatever happened: a crash status would make postgres restart */
}

static void detach_old_root(int wait) {
    /* CLONE_VM: no page tables to copy (a fork costs milliseconds here); the child keeps the
     * old address space alive after our exec, and needs only its own stack. */
    static char stack[64 * 1024] __attribute__((aligned(16)));
    pid_t pid = clone(detach_child, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL);
    if (pid < 0) die("clone", NULL);
    if (wait) {
        int status;
        if (waitpid(pid, &status, 0) != pid) die("waitpid", NULL);
        struct stat st;
        if (stat(OLDROOT "/usr", &st) == 0) { errno = EBUSY; die("old root still there", OLDROOT); }
    }
}

static void build_root(struct host_dirs *d, long tmp_mb, int wait_detach) {
    char opts[64];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("make private", "/");
    if (mount("tmpfs", NEWROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755") != 0) die("tmpfs", "root");
    bind_mount("/usr", "/usr", MS_RDONLY | MS_NOSUID | MS_NODEV, 1);
    bind_mount("/etc", "/etc", MS_RDONLY | MS_NOSUID | MS_NODEV, 1);
    const char *sys[] = {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"};
    for (size_t i = 0; i < sizeof sys / sizeof *sys; i++) system_dir(sys[i]);
    /* /dev: a few harmless character devices, nothing else */
    tmpfs("/dev", "size=64k,mode=0755");
    const char *devs[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
    for (size_t i = 0; i < sizeof devs / sizeof *devs; i++) bind_mount(devs[i], devs[i], MS_NOSUID | MS_NOEXEC, 0);
    snprintf(opts, sizeof opts, "size=%ldm,mode=1777", tmp_mb);
    tmpfs("/dev/shm", opts);
    tmpfs("/tmp", opts);
    char target[PATH_MAX];
    in_root(target, "/proc");
    mkdirs(target, 0555);
    if (mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("mount", "/proc");
    mount_data_dir(d);
    bind_fd(d->sockets_fd, d->sockets, MS_NOSUID | MS_NODEV | MS_NOEXEC);
    bind_fd(d->auth_fd, d->auth, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
    /* pivot into it, then detach the old root (and with it this namespace's copies of every
     * host mount, which would otherwise pin them) */
    in_root(target, OLDROOT);
    mkdirs(target, 0700);
    if (chdir(NEWROOT) != 0) die("chdir", NEWROOT);
    if (syscall(SYS_pivot_root, ".", "." OLDROOT) != 0) die("pivot_root", NEWROOT);
    if (chdir("/") != 0) die("chdir", "/");
    detach_old_root(wait_detach);
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755") != 0)
        die("remount read-only", "/");
}

static void drop_privileges(uid_t uid) {
    int last = CAP_LAST_CAP_FALLBACK;
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "r");
    if (f) { if (fscanf(f, "%d", &last) != 1) last = CAP_LAST_CAP_FALLBACK; fclose(f); }
    for (int cap = 0; cap <= last; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) die("drop capability", NULL);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) die("clear ambient", NULL);
    if (setgroups(0, NULL) != 0) die("setgroups", NULL);
    if (setresgid(uid, uid, uid) != 0) die("setresgid", NULL);
    if (setresuid(uid, uid, uid) != 0) die("setresuid", NULL); /* clears permitted/effective */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", NULL);
    /* The uid change cleared the parent-death signal -n set: set it again, so that when the
     * parent (the daemon's handle on the instance) is killed, this process (PID 1 of the
     * namespace: postgres, after exec) dies and takes every process of the namespace. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("parent-death signal", NULL);
}

/* ---- seccomp ---------------------------------------------------------------------------- */
#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "pgfleet-jail: add this architecture's AUDIT_ARCH"
#endif

static const int denied[] = {
    __NR_unshare, __NR_setns, __NR_mount, __NR_umount2, __NR_pivot_root, __NR_chroot,
    __NR_bpf, __NR_keyctl, __NR_add_key, __NR_request_key, __NR_ptrace, __NR_perf_event_open,
    __NR_process_vm_readv, __NR_process_vm_writev, __NR_kexec_load, __NR_init_module,
    __NR_finit_module, __NR_delete_module, __NR_userfaultfd, __NR_open_by_handle_at,
    __NR_name_to_handle_at, __NR_swapon, __NR_swapoff, __NR_reboot, __NR_acct,
    __NR_settimeofday, __NR_clock_settime, __NR_clock_adjtime, __NR_adjtimex, __NR_quotactl,
    __NR_vhangup, __NR_syslog, __NR_kcmp, __NR_personality,
#ifdef __NR_kexec_file_load
    __NR_kexec_file_load,
#endif
#ifdef __NR_iopl
    __NR_iopl, __NR_ioperm,
#endif
#ifdef __NR_uselib
    __NR_uselib,
#endif
#ifdef __NR_lookup_dcookie
    __NR_lookup_dcookie,
#endif
#ifdef __NR_io_uring_setup
    __NR_io_uring_setup, __NR_io_uring_enter, __NR_io_uring_register,
#endif
#ifdef __NR_open_tree
    __NR_open_tree, __NR_move_mount, __NR_fsopen, __NR_fsconfig, __NR_fsmount, __NR_fspick,
#endif
#ifdef __NR_pidfd_getfd
    __NR_pidfd_getfd,
#endif
#ifdef __NR_mount_setattr
    __NR_mount_setattr,
#endif
};

#define CLONE_NAMESPACES (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | \
                          CLONE_NEWPID | CLONE_NEWNET)

static void install_seccomp(void) {
    struct sock_filter f[128];
    size_t n = 0;
#define ADD(x) (f[n++] = (struct sock_filter)x)
    ADD(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    ADD(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0));
    ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS)); /* another ABI: no way around */
    ADD(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
#if defined(__x86_64__)
    ADD(BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1)); /* x32 numbers */
    ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
#endif
    for (size_t i = 0; i < sizeof denied / sizeof *denied; i++) {
        ADD(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)denied[i], 0, 1));
        ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
    }
#ifdef __NR_clone3
    ADD(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1));
    ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
#endif
    ADD(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 3));
    ADD(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]))); /* flags, low half */
    ADD(BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NAMESPACES, 0, 1));
    ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
    ADD(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
#undef ADD
    if (n > sizeof f / sizeof *f) { errno = E2BIG; die("seccomp filter", NULL); }
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = f};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0) die("seccomp", NULL);
}

/* -j and -n: move this process into each cgroup named (its cgroup.procs files) from argv[2] up
 * to "--"; returns the index of that "--" (argc if there is none). */
static int join_cgroups(int argc, char **argv) {
    int i = 2;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        int fd = open(argv[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0) die("open", argv[i]);
        if (write(fd, "0", 1) != 1) die("join cgroup", argv[i]);
        close(fd);
    }
    return i;
}

/* -j: join cgroups, then exec what follows "--" (still root, still in the host's namespaces) */
static int join_cgroups_then_exec(int argc, char **argv) {
    int i = join_cgroups(argc, argv);
    if (i + 1 >= argc) {
        fprintf(stderr, "usage: pgfleet-jail -j CGROUP_PROCS_FILE... -- COMMAND [ARG...]\n");
        return 111;
    }
    execvp(argv[i + 1], &argv[i + 1]);
    die("exec", argv[i + 1]);
    return 111;
}

/* -n: join the cgroups, unshare the namespaces and fork. The child (PID 1 of the new PID
 * namespace) returns the index of the "--" that ends the cgroup list and goes on as the jail
 * with what follows; the parent (the daemon's handle on the instance) waits for it and exits
 * with its status. What `unshare --fork --kill-child` did, without exec'ing a dynamically
 * linked program on every wake. */
static int join_and_enter_namespaces(int argc, char **argv) {
    int i = join_cgroups(argc, argv);
    if (i >= argc) { errno = EINVAL; die("-n without --", NULL); }
    if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP) != 0)
        die("unshare", NULL);
    pid_t child = fork();
    if (child < 0) die("fork", NULL);
    if (child == 0) {
        /* killed with the parent (set again after the uid change: see drop_privileges) */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) die("parent-death signal", NULL);
        return i;
    }
    int status;
    while (waitpid(child, &status, 0) != child)
        if (errno != EINTR) die("waitpid", NULL);
    if (WIFSIGNALED(status)) exit(128 + WTERMSIG(status));
    exit(WIFEXITED(status) ? WEXITSTATUS(status) : 111);
}

/* `run`: the jail's last step, given the command's argv (exec_command; zygote.c runs postgres'
 * main in place instead) */
static int jail_main(int argc, char **argv, void (*run)(char **argv)) {
    if (argc > 1 && strcmp(argv[1], "-j") == 0) return join_cgroups_then_exec(argc, argv);
    if (argc > 1 && strcmp(argv[1], "-n") == 0) {
        int rest = join_and_enter_namespaces(argc, argv); /* only the child returns */
        argv += rest; /* argv[0] is now the "--" */
        argc -= rest;
    }
    int wait_detach = argc > 1 && strcmp(argv[1], "-w") == 0;
    argv += wait_detach;
    argc -= wait_detach;
    int wal = argc > 7 && strcmp(argv[6], "--") != 0; /* the optional WAL_DIR */
    if (argc < 8 + wal || strcmp(argv[6 + wal], "--") != 0) {
        fprintf(stderr, "usage: pgfleet-jail [-w] UID TMP_MB DATA_DIR SOCKET_DIR AUTH_DIR [WAL_DIR] -- COMMAND [ARG...]\n");
        return 111;
    }
    char *end;
    long uid = strtol(argv[1], &end, 10);
    if (*end || uid <= 0) { errno = EINVAL; die("bad uid", argv[1]); }
    long tmp_mb = strtol(argv[2], &end, 10);
    if (*end || tmp_mb <= 0) { errno = EINVAL; die("bad size", argv[2]); }
    struct host_dirs d = {argv[3], argv[4], argv[5], wal ? argv[6] : NULL,
                          open_dir(argv[3]), open_dir(argv[4]), open_dir(argv[5]), wal ? open_dir(argv[6]) : -1};
    if (sethostname("pgfleet", 7) != 0) die("sethostname", NULL);
    build_root(&d, tmp_mb, wait_detach);
    drop_privileges((uid_t)uid);
    install_seccomp();
    /* a clean environment: nothing of the daemon's reaches the tenant */
    if (clearenv() != 0 || setenv("PATH", "/usr/local/bin:/usr/bin:/bin", 1) != 0 ||
        setenv("LANG", "C.UTF-8", 1) != 0 || setenv("HOME", "/tmp", 1) != 0)
        die("environment", NULL);
    run(&argv[7 + wal]);
    return 111;
}

#ifndef PGFLEET_ZYGOTE /* zygote.c includes this file and runs jail_main its own way */
static void exec_command(char **argv) {
    execvp(argv[0], argv);
    die("exec", argv[0]);
}

int main(int argc, char **argv) {
    return jail_main(argc, argv, exec_command);
}
#endif
