/*
 * An allocator hook for pikv_context_params.allocator that refuses allocations on
 * request (the Nth after arming, and optionally every later one) and counts the live
 * ones, for tests that inject allocation failures. (tests/alloc_failure.c has a
 * stricter hook of its own that also validates every free and alignment.)
 */
#ifndef PIKV_TEST_FAULT_HOOK_H
#define PIKV_TEST_FAULT_HOOK_H

#include <pikv/pikv.h>

#include <pthread.h>
#include <stdlib.h>

typedef struct tu_fault_hook {
    pthread_mutex_t mu; /* the library may allocate from more than one thread */
    long long calls;    /* allocations since arming */
    long long fail_at;  /* -1 = never fail */
    int fail_rest;      /* also fail every allocation after fail_at */
    long long refused;  /* allocations refused since arming */
    long long live;     /* allocations not yet freed */
} tu_fault_hook;

static tu_fault_hook tu_fault = {PTHREAD_MUTEX_INITIALIZER, 0, -1, 0, 0, 0};

static inline void *tu_fault_alloc(void *user, size_t size, size_t align)
{
    tu_fault_hook *h = user;
    pthread_mutex_lock(&h->mu);
    const long long n = h->calls++;
    const int fail = h->fail_at >= 0 && (n == h->fail_at || (h->fail_rest && n > h->fail_at));
    h->refused += fail;
    pthread_mutex_unlock(&h->mu);
    if (fail)
        return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size ? size : 1) != 0)
        return NULL;
    pthread_mutex_lock(&h->mu);
    h->live++;
    pthread_mutex_unlock(&h->mu);
    return p;
}

static inline void tu_fault_free(void *user, void *ptr)
{
    tu_fault_hook *h = user;
    if (!ptr)
        return;
    pthread_mutex_lock(&h->mu);
    h->live--;
    pthread_mutex_unlock(&h->mu);
    free(ptr);
}

/* Refuse allocation number fail_at (counted from now), and every later one if fail_rest. */
static inline void tu_fault_arm(long long fail_at, int fail_rest)
{
    pthread_mutex_lock(&tu_fault.mu);
    tu_fault.calls = 0;
    tu_fault.refused = 0;
    tu_fault.fail_at = fail_at;
    tu_fault.fail_rest = fail_rest;
    pthread_mutex_unlock(&tu_fault.mu);
}

/* Stop refusing; returns how many allocations were refused while armed. */
static inline long long tu_fault_disarm(void)
{
    pthread_mutex_lock(&tu_fault.mu);
    const long long refused = tu_fault.refused;
    tu_fault.fail_at = -1;
    pthread_mutex_unlock(&tu_fault.mu);
    return refused;
}

static inline long long tu_fault_live(void)
{
    pthread_mutex_lock(&tu_fault.mu);
    const long long live = tu_fault.live;
    pthread_mutex_unlock(&tu_fault.mu);
    return live;
}

/* Route a context's host allocations through the hook. */
static inline void tu_fault_install(pikv_context_params *cp)
{
    cp->allocator.alloc = tu_fault_alloc;
    cp->allocator.free = tu_fault_free;
    cp->allocator.user = &tu_fault;
}

#endif /* PIKV_TEST_FAULT_HOOK_H */
