
/* kiln thread pool: TVMBackendParallelLaunch with dynamically claimed chunks. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef void (*FMoveErr)(void** out);
typedef void (*FSetErr)(void* err);
typedef int (*FDecRef)(void* obj);

#define MAX_WORKERS 255
enum { ST_LAUNCHES, ST_POOLED, ST_INLINE, ST_SMALL, ST_CHUNKS_CALLER, ST_CHUNKS_WORKERS,
       ST_CALLER_SLEEPS, ST_WAKEUPS, ST_HANDOFFS, ST_WAKES_SKIPPED, ST_WORKERS, ST_N };

/* one job at a time: ticket = generation << 32 | next chunk (UINT32_MAX: closed while the job is written);
   the job's fields change only while the ticket is closed, so a claim (a CAS on the ticket) that succeeds
   read the fields of its own generation */
static _Atomic uint64_t ticket;
static _Atomic uint32_t gen_word;          /* futex: idle workers wait for a new generation */
static _Atomic uint32_t done_word;         /* futex: chunks finished in this generation */
static _Atomic(FLambda) job_f;
static _Atomic(void*) job_cdata;
static _Atomic int32_t job_n;
static _Atomic(void*) job_error;           /* first worker error (a TVM FFI Error handle) */
static _Atomic int job_helpers;           /* workers that ran a chunk of this generation */
static _Atomic int job_handoff;           /* a worker woke on the caller's CPU: no CPU was free */
static int wake_skip, wake_backoff;       /* the caller's: sleeping workers left asleep for a while */
static _Atomic int caller_waiting;
static _Atomic int caller_cpu = -1;        /* where the caller last launched from */
static _Atomic int sleepers;
static _Atomic int busy;
static _Atomic int test_mode;              /* tests: 1 workers claim nothing (as if descheduled), 2 only workers
                                              claim, 3 as 2, loops alternate few and many chunks, a worker that finds
                                              the loop's chunks all claimed pauses before it reads the job, the caller
                                              between writing the job and the ticket */

static _Atomic int n_threads = 1;
static _Atomic int chunks_per_thread = 4;
static _Atomic long spin_ns = 60000, wait_spin_ns = 30000, small_ns = 0, chunk_ns = 0;
static _Atomic int max_backoff = 256;
static FMoveErr move_err;
static FSetErr set_err;
static FDecRef dec_ref;

static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static int started;                        /* workers started in this process */
static pid_t owner_pid;
static _Atomic uint64_t st[ST_N];
static __thread int in_chunk;

static long futex(_Atomic uint32_t* addr, int op, uint32_t val) {
  return syscall(SYS_futex, (uint32_t*)addr, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static void test_pause(long ns) {
  struct timespec pause = {0, ns};
  nanosleep(&pause, NULL);
}

/* Run chunk i of the current job; a worker's error moves into job_error (first one kept). */
static void run_chunk(FLambda f, void* cdata, int32_t n, uint32_t i, int is_caller, int* failed) {
  TVMParallelGroupEnv env = {NULL, n};
  in_chunk = 1;
  int rc = f((int)i, &env, cdata);
  in_chunk = 0;
  if (rc != 0) {
    if (is_caller) {
      *failed = 1;
    } else if (move_err) {
      void* err = NULL;
      void* none = NULL;
      move_err(&err);
      if (err && !atomic_compare_exchange_strong(&job_error, &none, err) && dec_ref) dec_ref(err);
    }
  }
  atomic_fetch_add(&st[is_caller ? ST_CHUNKS_CALLER : ST_CHUNKS_WORKERS], 1);
  if (atomic_fetch_add(&done_word, 1) + 1 == (uint32_t)n && !is_caller &&
      atomic_load(&caller_waiting))
    futex(&done_word, FUTEX_WAKE, 1);
}

/* Claim and run chunks of generation g until none is left; returns how many it ran. */
static int drain(uint32_t g, int is_caller, int* failed) {
  int ran = 0;
  for (;;) {
    uint64_t t = atomic_load(&ticket);
    if ((uint32_t)(t >> 32) != g) return ran;
    if (!is_caller && atomic_load(&test_mode) == 3 && (uint32_t)t >= (uint32_t)atomic_load(&job_n))
      test_pause(200000);
    FLambda f = atomic_load(&job_f);
    void* cdata = atomic_load(&job_cdata);
    int32_t n = atomic_load(&job_n);
    uint32_t i = (uint32_t)t;
    if (i >= (uint32_t)n) return ran;
    if (!atomic_compare_exchange_weak(&ticket, &t, t + 1)) continue;
    if (!is_caller && ran == 0) {  /* counted before its first chunk can complete the job */
      atomic_fetch_add(&job_helpers, 1);
      if (sched_getcpu() == atomic_load(&caller_cpu)) atomic_store(&job_handoff, 1);
    }
    run_chunk(f, cdata, n, i, is_caller, failed);
    ++ran;
  }
}

static void* worker_main(void* arg) {
  int index = (int)(intptr_t)arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);  /* signals go to the application's own threads */
  pthread_setname_np(pthread_self(), "kiln-pool");
  uint32_t seen = atomic_load(&gen_word);
  int failed = 0;
  for (;;) {
    uint32_t g = atomic_load(&gen_word);
    if (g != seen && index < atomic_load(&n_threads) - 1 && atomic_load(&test_mode) != 1) {
      seen = g;
      drain(g, 0, &failed);
      continue;
    }
    seen = g;
    long deadline = now_ns() + atomic_load(&spin_ns);
    int k = 0;
    while (atomic_load(&gen_word) == seen) {
      cpu_relax();
      /* spinning on the CPU the caller last launched from would keep the caller off it */
      if ((++k & 63) == 0 && (now_ns() > deadline || sched_getcpu() == atomic_load(&caller_cpu))) {
        atomic_fetch_add(&sleepers, 1);
        futex(&gen_word, FUTEX_WAIT, seen);
        atomic_fetch_sub(&sleepers, 1);
        deadline = now_ns() + atomic_load(&spin_ns);
      }
    }
  }
  return NULL;
}

static void after_fork_child(void) {
  started = 0;
  owner_pid = getpid();
  atomic_store(&busy, 0);
  atomic_store(&sleepers, 0);
  atomic_store(&caller_waiting, 0);
  atomic_store(&st[ST_WORKERS], 0);
  pthread_mutex_init(&start_lock, NULL);
}

static void ensure_workers(int want) {
  if (want > MAX_WORKERS) want = MAX_WORKERS;
  if (started >= want && owner_pid == getpid()) return;
  pthread_mutex_lock(&start_lock);
  static int atfork_done;
  if (!atfork_done) { pthread_atfork(NULL, NULL, after_fork_child); atfork_done = 1; }
  if (owner_pid != getpid()) { started = 0; owner_pid = getpid(); }
  while (started < want) {
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&tid, &attr, worker_main, (void*)(intptr_t)started);
    pthread_attr_destroy(&attr);
    if (rc != 0) break;  /* no more threads: the caller does the rest */
    ++started;
    atomic_fetch_add(&st[ST_WORKERS], 1);
  }
  pthread_mutex_unlock(&start_lock);
}

/* Per parallel loop (its lambda): an estimate of its work in ns, which sizes its chunks. */
#define TABLE_BITS 10
typedef struct { _Atomic(FLambda) key; _Atomic long work_ns; } Entry;
static Entry table[1 << TABLE_BITS];

static Entry* entry_of(FLambda f) {
  uint64_t h = ((uint64_t)(uintptr_t)f * 0x9E3779B97F4A7C15ull) >> (64 - TABLE_BITS);
  for (int probe = 0; probe < 16; ++probe) {
    Entry* e = &table[(h + probe) & ((1 << TABLE_BITS) - 1)];
    FLambda k = atomic_load(&e->key);
    if (k == f) return e;
    if (k == NULL) {
      FLambda none = NULL;
      if (atomic_compare_exchange_strong(&e->key, &none, f) || none == f) return e;
    }
  }
  return NULL;  /* table full around here: this loop gets the default split */
}

static void record(Entry* e, long work) {
  long old = atomic_load(&e->work_ns);
  atomic_store(&e->work_ns, old ? (3 * old + work) / 4 : work);
}

/* Chunks for a loop of ``work`` ns: about chunk_ns each, at least one per thread, at most
   chunks_per_thread per thread (also the count when the work is not known yet). */
static int32_t chunks_for(long work, int threads) {
  int32_t most = threads * atomic_load(&chunks_per_thread);
  long per = atomic_load(&chunk_ns);
  if (work <= 0 || per <= 0) return most;
  long n = work / per;
  return n < threads ? threads : n > most ? most : (int32_t)n;
}

static int run_inline(FLambda f, void* cdata, int num_task) {
  atomic_fetch_add(&st[ST_INLINE], 1);
  int n = num_task > 0 ? num_task : 1;
  TVMParallelGroupEnv env = {NULL, n};
  for (int i = 0; i < n; ++i)
    if (f(i, &env, cdata) != 0) return -1;
  return 0;
}

int kiln_parallel_launch(FLambda f, void* cdata, int num_task) {
  atomic_fetch_add(&st[ST_LAUNCHES], 1);
  int threads = atomic_load(&n_threads);
  if (threads <= 1 || in_chunk) return run_inline(f, cdata, num_task);
  Entry* e = num_task == 0 ? entry_of(f) : NULL;
  long work = e ? atomic_load(&e->work_ns) : 0;
  if (work > 0 && work < atomic_load(&small_ns)) {
    /* too small to pay for waking a worker: the calling thread runs it (and re-measures it) */
    atomic_fetch_add(&st[ST_SMALL], 1);
    long t0 = now_ns();
    int rc = run_inline(f, cdata, 0);
    record(e, now_ns() - t0);
    return rc;
  }
  int expected = 0;
  if (!atomic_compare_exchange_strong(&busy, &expected, 1)) return run_inline(f, cdata, num_task);
  ensure_workers(threads - 1);
  atomic_fetch_add(&st[ST_POOLED], 1);
  int32_t n = num_task > 0 ? num_task : chunks_for(work, threads);
  long t0 = now_ns();
  uint32_t g = (uint32_t)(atomic_load(&ticket) >> 32) + 1;
  if (atomic_load(&test_mode) == 3 && (g & 1)) n = threads;  /* consecutive loops: few chunks, then many */
  /* Close the ticket before the job changes: a worker that read the last loop's ticket and then this
     job's fields (it was preempted in between) must fail its claim, or it runs a chunk of this job the
     count does not expect (the done count overshoots n and the caller sleeps forever). */
  atomic_store(&ticket, ((uint64_t)g << 32) | UINT32_MAX);
  atomic_store(&job_f, f);
  atomic_store(&job_cdata, cdata);
  atomic_store(&job_n, n);
  atomic_store(&job_error, NULL);
  atomic_store(&job_helpers, 0);
  atomic_store(&job_handoff, 0);
  atomic_store(&done_word, 0);
  atomic_store(&caller_cpu, sched_getcpu());
  if (atomic_load(&test_mode) == 3) test_pause(1000000);
  atomic_store(&ticket, (uint64_t)g << 32);
  atomic_store(&gen_word, g);
  /* Waking a worker helps only if a CPU is free for it; when the scheduler runs it on the caller's
     own CPU instead (a handoff: the caller waits in the run queue), leave sleepers asleep for the
     next 1, 2, 4 ... launches, until a wake lands on another CPU again. */
  int woke = 0;
  if (atomic_load(&sleepers) > 0) {
    if (wake_skip > 0 && atomic_load(&test_mode) < 2) {  /* modes 2 and 3: only workers run chunks */
      --wake_skip;
      atomic_fetch_add(&st[ST_WAKES_SKIPPED], 1);
    } else {
      atomic_fetch_add(&st[ST_WAKEUPS], 1);
      futex(&gen_word, FUTEX_WAKE, INT_MAX);
      woke = 1;
    }
  }
  int failed = 0, ran = 0;
  if (atomic_load(&test_mode) < 2 || started == 0) ran = drain(g, 1, &failed);
  if (atomic_load(&done_word) != (uint32_t)n) {
    long deadline = now_ns() + atomic_load(&wait_spin_ns);
    int k = 0;
    uint32_t d;
    while ((d = atomic_load(&done_word)) != (uint32_t)n) {
      cpu_relax();
      if ((++k & 63) == 0 && now_ns() > deadline) {
        atomic_fetch_add(&st[ST_CALLER_SLEEPS], 1);
        atomic_store(&caller_waiting, 1);
        while ((d = atomic_load(&done_word)) != (uint32_t)n) futex(&done_word, FUTEX_WAIT, d);
        atomic_store(&caller_waiting, 0);
      }
    }
  }
  /* the loop's work, at most: its wall time times the threads that ran chunks of it (a chunk's own
     time would mislead: when the loop has fewer iterations than chunks, some chunks are empty) */
  if (e) record(e, (now_ns() - t0) * ((ran > 0) + atomic_load(&job_helpers)));
  if (woke && atomic_load(&job_handoff)) {
    atomic_fetch_add(&st[ST_HANDOFFS], 1);
    int most = atomic_load(&max_backoff);
    wake_backoff = wake_backoff ? (wake_backoff * 2 > most ? most : wake_backoff * 2) : 1;
    wake_skip = wake_backoff > most ? most : wake_backoff;
  } else if (woke && atomic_load(&job_helpers) > 0) {
    wake_backoff = 0;
  }
  void* err = atomic_exchange(&job_error, NULL);
  atomic_store(&busy, 0);
  if (failed) {
    if (err && dec_ref) dec_ref(err);
    return -1;
  }
  if (err) {
    if (set_err) set_err(err);
    if (dec_ref) dec_ref(err);
    return -1;
  }
  return 0;
}

void kiln_pool_configure(int threads, int chunks, long spin_us, long wait_spin_us, long small_us,
                         long chunk_us, int backoff) {
  atomic_store(&max_backoff, backoff < 0 ? 0 : backoff);
  atomic_store(&n_threads, threads < 1 ? 1 : threads);
  atomic_store(&chunks_per_thread, chunks < 1 ? 1 : chunks);
  atomic_store(&spin_ns, spin_us * 1000L);
  atomic_store(&wait_spin_ns, wait_spin_us * 1000L);
  atomic_store(&small_ns, small_us * 1000L);
  atomic_store(&chunk_ns, chunk_us * 1000L);
}

void kiln_pool_forget(void) {
  for (int i = 0; i < (1 << TABLE_BITS); ++i) {
    atomic_store(&table[i].work_ns, 0);
    atomic_store(&table[i].key, NULL);
  }
}

void kiln_pool_set_error_api(void* move, void* set, void* decref) {
  move_err = (FMoveErr)move;
  set_err = (FSetErr)set;
  dec_ref = (FDecRef)decref;
}

void kiln_pool_set_test_mode(int mode) { atomic_store(&test_mode, mode); }

int kiln_pool_threads(void) { return atomic_load(&n_threads); }

void kiln_pool_stats(uint64_t* out) {
  for (int i = 0; i < ST_N; ++i) out[i] = atomic_load(&st[i]);
}
