/*
 * stream_crash: crash safety of checkpoints. A child process (this program re-executed with
 * --child) runs a deterministic workload: step s appends tokens derived from (seed, s) to two
 * sequences in every layer, then checkpoints (FULL at the first step of the file and every
 * 5th, else INCREMENTAL), announcing "starting step s" before and "step s committed as
 * generation g" after each checkpoint on a pipe. The parent SIGKILLs it at random moments:
 * after a random delay, or a random delay (0-3 ms) after it announced a checkpoint, so that
 * kills often land inside one (checkpoints are a few MB). After every kill, restoring the file
 * must succeed (unless no checkpoint was ever committed: then NOT_FOUND, the FULL's rename
 * never happened) and give a state of s steps with last committed <= s <= last started, bit
 * for bit equal (attend over every layer, statistics) to a reference the parent rebuilds by
 * replaying s steps: never a mix, never a crash. A third of the children continue the
 * existing file: they restore it and, as a restored cache has no checkpoint of its own, start
 * with a FULL (tmp + rename) and go on incrementally.
 * At least 100 kills, within 25 s; PIKV_CRASH_ITERS=n runs n kills without the time limit.
 */
#include "stream-util.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#define STEP_TOKENS 48
#define MAX_STEPS 9

static pikv_cache_params crash_params(void)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 2;
    p.n_q_heads = 4;
    p.n_kv_heads = 4;
    p.head_dim = 64;
    p.n_experts = 2;
    p.experts_per_token = 1;
    p.page_size = 16;
    p.dtype = PIKV_DTYPE_F32;
    p.max_sequences = 4;
    return p;
}

/* Step s (1-based): the same tokens whatever happened before. */
static pikv_status run_step(pikv_cache *c, const pikv_cache_params *p, int s)
{
    tu_rng r = tu_rng_seed(0xC0FFEEull * (uint64_t)s + 17);
    for (int l = 0; l < p->n_layers; l++)
        for (int q = 0; q < 2; q++) {
            pikv_status st = su_append(c, p, &r, l, q, STEP_TOKENS);
            if (st != PIKV_OK)
                return st;
        }
    return PIKV_OK;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void send_msg(int fd, int kind, int step, uint64_t gen)
{
    int64_t m[3] = {kind, step, (int64_t)gen};
    if (write(fd, m, sizeof m) != (ssize_t)sizeof m)
        _exit(3);
}

/* The child: continue = restore the file first. Exits 0 after MAX_STEPS steps. */
static int child_main(const char *path, int fd, int cont)
{
    pikv_context *ctx = tu_context(1);
    if (!ctx)
        return 4;
    pikv_cache_params p = crash_params();
    pikv_cache *c = su_cache(ctx, &p);
    int step = 0;
    if (cont) {
        pikv_status st = pikv_cache_restore(c, path, NULL);
        if (st == PIKV_OK) {
            int64_t len = 0;
            if (pikv_seq_length(c, 0, 0, &len) != PIKV_OK)
                return 5;
            step = (int)(len / STEP_TOKENS);
        } else if (st != PIKV_ERR_NOT_FOUND) {
            fprintf(stderr, "child: restore: %s\n", pikv_context_last_error(ctx));
            return 6;
        }
    }
    if (step == 0 && (pikv_seq_add(c, 0) != PIKV_OK || pikv_seq_add(c, 1) != PIKV_OK))
        return 7;
    for (int i = 0; step < MAX_STEPS; i++) {
        step++;
        if (run_step(c, &p, step) != PIKV_OK)
            return 8;
        const int full = i == 0 || step % 5 == 0;
        send_msg(fd, 'S', step, 0);
        pikv_checkpoint_stats cs;
        pikv_status st = pikv_cache_checkpoint(c, path, full ? PIKV_CHECKPOINT_FULL : PIKV_CHECKPOINT_INCREMENTAL, &cs);
        if (st != PIKV_OK) {
            fprintf(stderr, "child: checkpoint of step %d: %s\n", step, pikv_context_last_error(ctx));
            return 9;
        }
        send_msg(fd, 'D', step, cs.generation);
    }
    pikv_cache_free(c);
    pikv_context_free(ctx);
    return 0;
}

/* Reads one message, waiting at most timeout_ms; 0 = none (timeout or end). */
static int read_msg(int fd, int64_t *m, int timeout_ms)
{
    size_t got = 0;
    while (got < 3 * sizeof(int64_t)) {
        struct pollfd pfd = {fd, POLLIN, 0};
        int k = poll(&pfd, 1, timeout_ms);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return 0;
        ssize_t n = read(fd, (char *)m + got, 3 * sizeof(int64_t) - got);
        if (n <= 0)
            return 0;
        got += (size_t)n;
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "--child") == 0)
        return child_main(argv[2], atoi(argv[3]), atoi(argv[4]));
    const char *iters_env = getenv("PIKV_CRASH_ITERS");
    const int want_kills = iters_env ? atoi(iters_env) : 100;
    const double limit_s = iters_env ? 1e9 : 25.0;
    char *dir = su_tmpdir("crash");
    char path[600];
    snprintf(path, sizeof path, "%s/crash.pikv", dir);
    pikv_cache_params p = crash_params();
    tu_rng r = tu_rng_seed((uint64_t)time(NULL));
    const double t0 = now_s();
    int kills = 0, inside = 0, restores = 0, in_flight_restored = 0, continued = 0, finished = 0;
    int known_steps = 0; /* the steps the file holds (verified), 0 = no file */
    while (kills < want_kills && now_s() - t0 < limit_s && tu_fail_count == 0) {
        const int cont = known_steps > 0 && known_steps < MAX_STEPS - 1 && tu_int(&r, 0, 2) == 0;
        if (!cont) {
            unlink(path);
            known_steps = 0;
        }
        continued += cont;
        int fds[2];
        if (pipe(fds) != 0)
            return 2;
        char fdarg[16], contarg[4];
        snprintf(fdarg, sizeof fdarg, "%d", fds[1]);
        snprintf(contarg, sizeof contarg, "%d", cont);
        pid_t pid = fork();
        if (pid == 0) {
            close(fds[0]);
            char *args[] = {argv[0], (char *)"--child", path, fdarg, contarg, NULL};
            execv(argv[0], args);
            _exit(127);
        }
        close(fds[1]);
        /* when to kill: some time after a checkpoint starts, or after a random delay */
        const int target = (int)tu_int(&r, 1, MAX_STEPS);
        const int by_delay = tu_int(&r, 0, 3) == 0;
        const int delay_us = by_delay ? (int)tu_int(&r, 0, 150000) : (int)tu_int(&r, 0, 3000);
        int last_done = known_steps, last_started = known_steps, started_target = 0;
        uint64_t last_gen = 0;
        int64_t m[3];
        if (!by_delay) {
            while (read_msg(fds[0], m, 5000)) {
                if (m[0] == 'S')
                    last_started = (int)m[1];
                if (m[0] == 'D')
                    last_done = (int)m[1], last_gen = (uint64_t)m[2];
                if (m[0] == 'S' && m[1] >= target) {
                    started_target = 1;
                    break;
                }
            }
        }
        struct timespec ts = {delay_us / 1000000, (long)(delay_us % 1000000) * 1000};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        while (read_msg(fds[0], m, 0)) { /* what it said before dying */
            if (m[0] == 'S')
                last_started = (int)m[1];
            if (m[0] == 'D')
                last_done = (int)m[1], last_gen = (uint64_t)m[2];
        }
        close(fds[0]);
        if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
            kills++;
            inside += last_started > last_done;
        } else {
            finished++;
            CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child exited with status %d",
                   WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        }
        (void)started_target;

        /* the file holds a committed state between what was announced and what was started */
        tu_set_case("kill %d (steps done %d, started %d, continued %d)", kills, last_done, last_started, cont);
        pikv_context *ctx = tu_context(1);
        tu_err_ctx = ctx;
        pikv_cache *c = su_cache(ctx, &p);
        pikv_restore_report rep;
        memset(&rep, 0, sizeof rep);
        pikv_status st = pikv_cache_restore(c, path, &rep);
        restores++;
        if (last_started == 0 || (last_done == 0 && st == PIKV_ERR_NOT_FOUND)) {
            CHECKF(st == PIKV_ERR_NOT_FOUND && last_done == 0, "no checkpoint committed: %s (%s)",
                   pikv_status_name(st), pikv_context_last_error(ctx));
            known_steps = 0;
        } else if (CHECKF(st == PIKV_OK, "restore: %s: %s", pikv_status_name(st), pikv_context_last_error(ctx))) {
            int64_t len = -1;
            CHECK_OK(pikv_seq_length(c, 0, 0, &len));
            const int s = (int)(len / STEP_TOKENS);
            CHECKF(len % STEP_TOKENS == 0 && s >= last_done && s <= last_started,
                   "restored %lld tokens (%d steps): outside steps %d..%d", (long long)len, s, last_done, last_started);
            if (s == last_done && last_gen > 0)
                CHECKF(rep.generation == last_gen, "generation %llu, the child committed %llu for step %d",
                       (unsigned long long)rep.generation, (unsigned long long)last_gen, s);
            in_flight_restored += s > last_done;
            CHECK_EQ(rep.n_failed, 0);
            pikv_cache *ref = su_cache(ctx, &p);
            CHECK_OK(pikv_seq_add(ref, 0));
            CHECK_OK(pikv_seq_add(ref, 1));
            for (int i = 1; i <= s; i++)
                CHECK_OK(run_step(ref, &p, i));
            char why[256] = "";
            CHECKF(su_same_stats(ref, c, &p, why, sizeof why), "restored %d steps: %s", s, why);
            CHECKF(su_same_attend(ref, c, &p, 9, 0.0), "restored %d steps: attend differs from the replay", s);
            pikv_cache_free(ref);
            known_steps = s;
        }
        pikv_cache_free(c);
        pikv_context_free(ctx);
    }
    printf("%d kills (%d inside a checkpoint, %d restored the checkpoint in flight), %d children finished, "
           "%d continued a file, %d restores, %.1f s\n", kills, inside, in_flight_restored, finished, continued, restores,
           now_s() - t0);
    CHECKF(kills >= (want_kills < 100 ? want_kills : 100) || now_s() - t0 >= limit_s, "%d kills", kills);
    CHECKF(inside >= kills / 10, "only %d of %d kills landed inside a checkpoint", inside, kills);
    su_rmdir(dir);
    return tu_finish();
}
