// The runtime of the CUDA emulation (see moelab_emu.h): launches, the fiber scheduler, warp
// collectives, atomics, and the checks. Compiled WITHOUT sanitizer instrumentation: the kernels'
// instrumentation calls the __asan_* / __ubsan_* entry points defined here.
//
// Why not the real AddressSanitizer runtime: it must be linked into the main executable (a Rust
// test binary, which stable rustc links without -fsanitize=address; -Zsanitizer is nightly-only)
// and it would need every fiber switch annotated. Instead the kernels are compiled with ASan's
// compiler instrumentation in its kernel mode (-fsanitize=kernel-address with calls instead of
// inline shadow checks), so every load and store of kernel code reaches __asan_{load,store}*
// below, where each address is checked against what the kernel may touch: its fiber's stack,
// its block's shared memory (with the race check) and the buffers passed to the launch (which
// catches global out-of-bounds accesses exactly, not only past a malloc chunk). UBSan is the
// compiler's own (-fsanitize=undefined, bounds included: an index past a statically sized
// shared array is reported with its file and line) with the handlers defined here.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moelab_emu.h"

extern "C" {
// One buffer a kernel may access: its name (for messages), first byte and size.
struct MoelabEmuBuffer {
  const char *name;
  const void *ptr;
  size_t bytes;
};

// One launch, as moelab-kernels' emu module describes it.
struct MoelabEmuLaunch {
  const char *kernel;
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t shared_bytes;
  uint32_t os_threads;
  void (*body)(void *ctx);
  void *ctx;
  const MoelabEmuBuffer *buffers;
  size_t n_buffers;
};
}

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxThreads = 1024;

struct DynShared {
  const char *name;
  void *(*address)();
  size_t capacity;
};

std::vector<DynShared> &dyn_shared_arrays() {
  static std::vector<DynShared> arrays;
  return arrays;
}

struct Launch {
  const MoelabEmuLaunch *cfg;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  uint64_t error_block = UINT64_MAX;  // linear index of the block whose error `error` is
};

enum class State { Runnable, Barrier, Warp, Done };

struct Fiber {
  void *sp = nullptr;
  uintptr_t stack_lo = 0, stack_hi = 0;
  uint3 tid{};
  uint32_t linear = 0;
  State state = State::Runnable;
  const char *file = nullptr;  // where it waits
  int line = 0;
};

struct WarpSync {
  uint32_t arrived = 0;  // lanes arrived, as a mask
  int kind = 0;
  uint32_t mask = 0;
  const char *file = nullptr;
  int line = 0;
  uint64_t values[32]{};
  int args[32]{};
  int width = 32;
  uint64_t results[32]{};
};

// Per byte of shared memory: which threads touched it since the last barrier (bytes, not words:
// threads may write neighbouring bytes of one word, like router_topk's `taken` flags).
struct Shadow {
  uint32_t epoch = 0;
  int32_t writer = -1;
  int32_t reader = -1;   // the first thread that read it, -1 none
  int32_t reader2 = -1;  // another thread that read it, -1 none
};

// One OS thread running blocks.
struct Worker {
  Launch *launch = nullptr;
  uint3 block{};
  uint32_t n_threads = 0;
  std::vector<Fiber> fibers;
  char *stacks = nullptr;
  size_t stacks_bytes = 0;
  void *sched_sp = nullptr;
  Fiber *current = nullptr;
  bool aborted = false;
  uint32_t barrier_count = 0;
  const char *barrier_file = nullptr;
  int barrier_line = 0;
  uint32_t done = 0;
  std::vector<WarpSync> warps;
  uint32_t epoch = 1;
  uintptr_t tls_lo = 0, tls_hi = 0;
  std::vector<Shadow> shadow;
  // The dynamic shared arrays in this thread: [lo, lo + launch bytes) valid, up to hi invalid.
  std::vector<std::pair<uintptr_t, uintptr_t>> dyn_ranges;
};

thread_local Worker *tl_worker = nullptr;

// ---- context switch -------------------------------------------------------------------------

extern "C" void moelab_emu_switch(void **save_sp, void *to_sp);

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, and resumes the context saved at to_sp.
asm(R"(
.text
.p2align 4
.globl moelab_emu_switch
.hidden moelab_emu_switch
.type moelab_emu_switch,@function
moelab_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size moelab_emu_switch, .-moelab_emu_switch
)");
#else
#error "the CUDA emulation's fiber switch is written for x86_64 only"
#endif

[[noreturn]] void fiber_main();

// A fresh context on [lo, hi) that starts in fiber_main.
void *init_stack(uintptr_t hi) {
  uintptr_t top = hi & ~uintptr_t(15);
  uint64_t *sp = reinterpret_cast<uint64_t *>(top);
  *--sp = 0;                                               // fiber_main's "return address"
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);         // where the switch's ret lands
  for (int i = 0; i < 6; ++i) *--sp = 0;                   // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
  return sp;
}

// ---- errors ---------------------------------------------------------------------------------

std::string vformat(const char *fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

std::string format(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string thread_name(const uint3 &t) { return format("(%u,%u,%u)", t.x, t.y, t.z); }

std::string where(Worker *w) {
  return format("kernel %s, block (%u,%u,%u)", w->launch->cfg->kernel, w->block.x, w->block.y,
                w->block.z);
}

// Records the error and stops the block; from a fiber it never returns. Of the blocks that
// fail, the lowest-numbered one's error is reported (the same message whichever OS thread ran
// which block: block 0 is always handed out, so it always runs to its error).
void fail_block(Worker *w, const std::string &msg) {
  {
    const MoelabEmuLaunch *cfg = w->launch->cfg;
    const uint64_t b = w->block.x + (uint64_t)cfg->grid[0] *
                                        (w->block.y + (uint64_t)cfg->grid[1] * w->block.z);
    std::lock_guard<std::mutex> lock(w->launch->error_mutex);
    if (b < w->launch->error_block) {
      w->launch->error = msg;
      w->launch->error_block = b;
    }
  }
  w->launch->failed.store(true);
  w->aborted = true;
  if (w->current != nullptr) {
    Fiber *f = w->current;
    moelab_emu_switch(&f->sp, w->sched_sp);
    abort();  // an aborted fiber is never resumed
  }
}

[[noreturn]] void fail_fiber(Worker *w, const std::string &msg) {
  fail_block(w, msg);
  abort();
}

Worker *need_worker(const char *what) {
  Worker *w = tl_worker;
  if (w == nullptr || w->current == nullptr) {
    fprintf(stderr, "moelab emu: %s called outside an emulated kernel launch\n", what);
    abort();
  }
  return w;
}

// ---- scheduling -----------------------------------------------------------------------------

// Back to the scheduler until this fiber is runnable again.
void block_current(Worker *w, State s, const char *file, int line) {
  Fiber *f = w->current;
  f->state = s;
  f->file = file;
  f->line = line;
  moelab_emu_switch(&f->sp, w->sched_sp);
}

[[noreturn]] void fiber_main() {
  Worker *w = tl_worker;
  w->launch->cfg->body(w->launch->cfg->ctx);
  Fiber *f = w->current;
  f->state = State::Done;
  ++w->done;
  moelab_emu_switch(&f->sp, w->sched_sp);
  abort();  // a finished fiber is never resumed
}

// The description of a block in which no thread can run.
std::string deadlock_message(Worker *w) {
  std::string at_barrier, at_warp, exited;
  uint32_t n_barrier = 0, n_warp = 0, n_done = 0;
  for (const Fiber &f : w->fibers) {
    std::string *list = nullptr;
    if (f.state == State::Barrier) {
      ++n_barrier;
      list = &at_barrier;
    } else if (f.state == State::Warp) {
      ++n_warp;
      list = &at_warp;
    } else if (f.state == State::Done) {
      ++n_done;
      list = &exited;
    }
    if (list != nullptr && list->size() < 160) {
      *list += " " + thread_name(f.tid);
      if (f.state != State::Done) *list += format(" at %s:%d", f.file, f.line);
    }
  }
  return format(
      "barrier deadlock in %s: %u threads wait at __syncthreads() [%s ], %u wait at a warp "
      "collective [%s ], %u have exited [%s ]; every thread of a block must reach the same "
      "__syncthreads()",
      where(w).c_str(), n_barrier, at_barrier.c_str(), n_warp, at_warp.c_str(), n_done,
      exited.c_str());
}

// Runs one block to completion (or to its first error).
void run_block(Worker *w) {
  const MoelabEmuLaunch *cfg = w->launch->cfg;
  const uint32_t n = w->n_threads;
  w->aborted = false;
  w->done = 0;
  w->barrier_count = 0;
  ++w->epoch;
  for (WarpSync &ws : w->warps) ws.arrived = 0;
  for (auto &r : w->dyn_ranges) {
    // Uninitialised shared memory reads as NaN / 0xFF bytes, like a poisoned output.
    memset(reinterpret_cast<void *>(r.first), 0xff, cfg->shared_bytes);
  }
  for (uint32_t i = 0; i < n; ++i) {
    Fiber &f = w->fibers[i];
    f.state = State::Runnable;
    f.sp = init_stack(f.stack_hi);
  }
  while (true) {
    bool ran = false;
    for (uint32_t i = 0; i < n; ++i) {
      Fiber &f = w->fibers[i];
      if (f.state != State::Runnable) continue;
      ran = true;
      w->current = &f;
      moelab_emu_switch(&w->sched_sp, f.sp);
      w->current = nullptr;
      if (w->aborted) return;
    }
    if (w->done == n) return;
    if (!ran) {
      fail_block(w, deadlock_message(w));
      return;
    }
  }
}

// Finds the calling thread's TLS block of the module holding the kernels (shared memory).
int find_tls(struct dl_phdr_info *info, size_t, void *data) {
  Worker *w = static_cast<Worker *>(data);
  const uintptr_t probe = reinterpret_cast<uintptr_t>(&moelab_emu_syncthreads);
  bool mine = false;
  size_t tls_size = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr) &ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && probe >= lo && probe < lo + ph.p_memsz) mine = true;
    if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
  }
  if (!mine) return 0;
  w->tls_lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
  w->tls_hi = w->tls_lo + tls_size;
  return 1;
}

bool setup_worker(Worker *w, Launch *launch) {
  const MoelabEmuLaunch *cfg = launch->cfg;
  w->launch = launch;
  w->n_threads = cfg->block[0] * cfg->block[1] * cfg->block[2];
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t slot = kStackBytes + page;  // a guard page below each stack
  w->stacks_bytes = slot * w->n_threads;
  void *mem = mmap(nullptr, w->stacks_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) return false;
  w->stacks = static_cast<char *>(mem);
  w->fibers.assign(w->n_threads, Fiber{});
  for (uint32_t i = 0; i < w->n_threads; ++i) {
    Fiber &f = w->fibers[i];
    char *base = w->stacks + i * slot;
    mprotect(base, page, PROT_NONE);
    f.stack_lo = reinterpret_cast<uintptr_t>(base + page);
    f.stack_hi = f.stack_lo + kStackBytes;
    f.linear = i;
    f.tid = uint3{i % cfg->block[0], (i / cfg->block[0]) % cfg->block[1],
                  i / (cfg->block[0] * cfg->block[1])};
  }
  w->warps.assign((w->n_threads + 31) / 32, WarpSync{});
  dl_iterate_phdr(find_tls, w);
  if (w->tls_hi > w->tls_lo) w->shadow.assign(w->tls_hi - w->tls_lo, Shadow{});
  for (const DynShared &d : dyn_shared_arrays()) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(d.address());
    w->dyn_ranges.emplace_back(lo, lo + d.capacity);
  }
  return true;
}

void worker_main(Launch *launch) {
  Worker w;
  tl_worker = &w;
  const MoelabEmuLaunch *cfg = launch->cfg;
  if (!setup_worker(&w, launch)) {
    std::lock_guard<std::mutex> lock(launch->error_mutex);
    launch->error = format("kernel %s: cannot map %u fiber stacks", cfg->kernel, w.n_threads);
    launch->error_block = 0;
    launch->failed.store(true);
  }
  const uint64_t gx = cfg->grid[0], gy = cfg->grid[1];
  const uint64_t total = gx * gy * cfg->grid[2];
  while (!launch->failed.load()) {
    const uint64_t b = launch->next_block.fetch_add(1);
    if (b >= total) break;
    w.block = uint3{(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / (gx * gy))};
    run_block(&w);
  }
  if (w.stacks != nullptr) munmap(w.stacks, w.stacks_bytes);
  tl_worker = nullptr;
}

// ---- memory checks --------------------------------------------------------------------------

// The thread-local (static __shared__) variable at `offset` of the kernels' TLS block, named
// from the executable's symbol table (demangled: `kernel::name` for a kernel's local), with the
// byte's offset in it; empty when the symbol table is unavailable (a stripped binary).
std::string tls_symbol_at(uintptr_t offset) {
  const int fd = open("/proc/self/exe", O_RDONLY);
  if (fd < 0) return "";
  struct stat st;
  std::string found;
  if (fstat(fd, &st) == 0 && (size_t)st.st_size > sizeof(Elf64_Ehdr)) {
    void *map = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const char *base = static_cast<const char *>(map);
      const auto *eh = reinterpret_cast<const Elf64_Ehdr *>(base);
      const auto *sh = reinterpret_cast<const Elf64_Shdr *>(base + eh->e_shoff);
      const bool sane = memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
                        eh->e_shoff + (size_t)eh->e_shnum * sizeof(Elf64_Shdr) <= (size_t)st.st_size;
      for (int i = 0; sane && i < eh->e_shnum && found.empty(); ++i) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const auto *syms = reinterpret_cast<const Elf64_Sym *>(base + sh[i].sh_offset);
        const char *names = base + sh[sh[i].sh_link].sh_offset;
        const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
        for (size_t j = 0; j < n; ++j) {
          const Elf64_Sym &sym = syms[j];
          if (ELF64_ST_TYPE(sym.st_info) != STT_TLS || offset < sym.st_value ||
              offset >= sym.st_value + sym.st_size) {
            continue;
          }
          const char *raw = names + sym.st_name;
          int status = 0;
          char *demangled = abi::__cxa_demangle(raw, nullptr, nullptr, &status);
          found = format("%s byte %zu", status == 0 ? demangled : raw,
                         (size_t)(offset - sym.st_value));
          free(demangled);
          break;
        }
      }
      munmap(map, (size_t)st.st_size);
    }
  }
  close(fd);
  return found;
}

std::string shared_word_name(Worker *w, uintptr_t addr) {
  for (size_t i = 0; i < w->dyn_ranges.size(); ++i) {
    const auto &r = w->dyn_ranges[i];
    if (addr >= r.first && addr < r.second) {
      return format("dynamic shared %s byte %zu", dyn_shared_arrays()[i].name,
                    (size_t)(addr - r.first));
    }
  }
  const std::string name = tls_symbol_at(addr - w->tls_lo);
  if (!name.empty()) return "__shared__ " + name;
  return format("static shared byte %zu of the block's shared variables",
                (size_t)(addr - w->tls_lo));
}

void race(Worker *w, uintptr_t addr, const char *first, int32_t other, const char *second) {
  fail_fiber(w, format("shared-memory race in %s: %s, %s by thread %s and %s by thread %s with "
                       "no __syncthreads() between",
                       where(w).c_str(), shared_word_name(w, addr).c_str(), first,
                       thread_name(w->fibers[other].tid).c_str(), second,
                       thread_name(w->current->tid).c_str()));
}

void shared_access(Worker *w, uintptr_t addr, size_t size, bool write) {
  for (size_t i = 0; i < w->dyn_ranges.size(); ++i) {
    const auto &r = w->dyn_ranges[i];
    const uintptr_t valid_hi = r.first + w->launch->cfg->shared_bytes;
    if (addr + size > valid_hi && addr < r.second) {
      fail_fiber(w, format("shared-memory out of bounds in %s: thread %s %s %zu bytes at byte "
                           "%zd of dynamic shared %s, past the launch's %u bytes",
                           where(w).c_str(), thread_name(w->current->tid).c_str(),
                           write ? "writes" : "reads", size, (ssize_t)(addr - r.first),
                           dyn_shared_arrays()[i].name, w->launch->cfg->shared_bytes));
    }
  }
  const int32_t me = (int32_t)w->current->linear;
  for (uintptr_t a = addr; a < addr + size; ++a) {
    Shadow &s = w->shadow[a - w->tls_lo];
    if (s.epoch != w->epoch) s = Shadow{w->epoch, -1, -1, -1};
    if (s.writer >= 0 && s.writer != me) {
      race(w, a, "written", s.writer, write ? "written" : "read");
    }
    if (write) {
      if (s.reader >= 0 && s.reader != me) race(w, a, "read", s.reader, "written");
      if (s.reader2 >= 0 && s.reader2 != me) race(w, a, "read", s.reader2, "written");
      s.writer = me;
    } else if (s.reader == -1) {
      s.reader = me;
    } else if (s.reader != me && s.reader2 == -1) {
      s.reader2 = me;
    }
  }
}

// Checks one access of kernel code; outside a launch (host code calling header functions)
// there is nothing to check.
inline void check_access(uintptr_t addr, size_t size, bool write) {
  Worker *w = tl_worker;
  if (w == nullptr || w->current == nullptr) return;
  Fiber *f = w->current;
  if (addr >= f->stack_lo && addr + size <= f->stack_hi) return;
  if (addr >= w->tls_lo && addr + size <= w->tls_hi) {
    shared_access(w, addr, size, write);
    return;
  }
  const MoelabEmuLaunch *cfg = w->launch->cfg;
  const MoelabEmuBuffer *nearest = nullptr;
  intptr_t nearest_off = 0;
  for (size_t i = 0; i < cfg->n_buffers; ++i) {
    const MoelabEmuBuffer &b = cfg->buffers[i];
    const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
    if (addr >= lo && addr + size <= lo + b.bytes) return;
    const intptr_t off = (intptr_t)(addr - lo);
    if (nearest == nullptr || llabs(off - (intptr_t)b.bytes / 2) <
                                  llabs(nearest_off - (intptr_t)nearest->bytes / 2)) {
      nearest = &b;
      nearest_off = off;
    }
  }
  uintptr_t stack_lo = f->stack_lo;
  if (addr < stack_lo && addr + 65536 >= stack_lo) {
    fail_fiber(w, format("stack overflow in %s, thread %s (the emulation gives each thread %zu "
                         "bytes of stack)",
                         where(w).c_str(), thread_name(f->tid).c_str(), kStackBytes));
  }
  std::string near = "no buffer was passed";
  if (nearest != nullptr) {
    near = format("nearest buffer: %s (%zu bytes), at byte offset %zd of it", nearest->name,
                  nearest->bytes, (ssize_t)nearest_off);
  }
  fail_fiber(w, format("global out of bounds in %s: thread %s %s %zu bytes at %p, outside every "
                       "buffer of the launch and shared memory (%s)",
                       where(w).c_str(), thread_name(f->tid).c_str(),
                       write ? "writes" : "reads", size, reinterpret_cast<void *>(addr),
                       near.c_str()));
}

// Computes every participating lane's result of the collective the warp's lanes all reached.
void complete_warp(Worker *w, WarpSync &ws, uint32_t warp, const char *name, const char *file,
                   int line) {
  const int kind = ws.kind;
  const uint32_t mask = ws.mask;
  uint64_t ballot = 0;
  for (uint32_t l = 0; l < 32; ++l) {
    if ((mask >> l) & 1u) ballot |= (ws.values[l] != 0 ? 1u : 0u) << l;
  }
  for (uint32_t l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) == 0) continue;
    const int a = ws.args[l];
    const uint32_t seg = l / (uint32_t)ws.width * (uint32_t)ws.width;
    uint32_t src = l;
    switch (kind) {
      case MOELAB_EMU_SHFL_IDX:
        src = seg + ((uint32_t)a % (uint32_t)ws.width);
        break;
      case MOELAB_EMU_SHFL_XOR:
        src = l ^ (uint32_t)a;
        // A lane of a later width-segment is not readable: the caller keeps its own value.
        if (src / (uint32_t)ws.width > l / (uint32_t)ws.width || src >= 32) src = l;
        break;
      case MOELAB_EMU_SHFL_DOWN:
        src = (l - seg) + (uint32_t)a < (uint32_t)ws.width ? l + (uint32_t)a : l;
        break;
      case MOELAB_EMU_SHFL_UP:
        src = (l - seg) >= (uint32_t)a ? l - (uint32_t)a : l;
        break;
      default:
        break;
    }
    if (((mask >> src) & 1u) == 0) {
      fail_fiber(w, format("shuffle reads the wrong lane in %s: lane %u of warp %u reads lane "
                           "%u through %s at %s:%d, but lane %u is not in the mask 0x%08x (its "
                           "value is undefined)",
                           where(w).c_str(), l, warp, src, name, file, line, src, mask));
    }
    ws.results[l] = kind == MOELAB_EMU_BALLOT ? ballot
                    : kind == MOELAB_EMU_SYNCWARP ? 0
                                                  : ws.values[src];
  }
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------

extern "C" {

// Registers an `extern __shared__` array (build.rs generates the calls).
int moelab_emu_register_dyn_shared(const char *name, void *(*address)(), size_t capacity) {
  dyn_shared_arrays().push_back(DynShared{name, address, capacity});
  return 0;
}

// Runs a launch to completion; returns 0, or 1 with a message in err.
int moelab_emu_launch(const MoelabEmuLaunch *cfg, char *err, size_t err_len) {
  static std::mutex launch_mutex;  // one launch at a time: a launch owns its workers' shared
  std::lock_guard<std::mutex> guard(launch_mutex);
  auto bad = [&](const std::string &msg) {
    snprintf(err, err_len, "%s", msg.c_str());
    return 1;
  };
  const uint64_t threads = (uint64_t)cfg->block[0] * cfg->block[1] * cfg->block[2];
  if (cfg->block[0] == 0 || cfg->block[1] == 0 || cfg->block[2] == 0 || threads > kMaxThreads ||
      cfg->block[2] > 64) {
    return bad(format("kernel %s: invalid block (%u,%u,%u): at most 1024 threads, z <= 64",
                      cfg->kernel, cfg->block[0], cfg->block[1], cfg->block[2]));
  }
  if (cfg->grid[0] == 0 || cfg->grid[1] == 0 || cfg->grid[2] == 0 ||
      cfg->grid[0] > 0x7fffffffu || cfg->grid[1] > 65535 || cfg->grid[2] > 65535) {
    return bad(format("kernel %s: invalid grid (%u,%u,%u): x < 2^31, y and z <= 65535, none 0",
                      cfg->kernel, cfg->grid[0], cfg->grid[1], cfg->grid[2]));
  }
  if (cfg->shared_bytes > (size_t)MOELAB_EMU_MAX_DYN_SHARED) {
    return bad(format("kernel %s: %u bytes of dynamic shared memory exceed the %zu a launch "
                      "may use without opting in",
                      cfg->kernel, cfg->shared_bytes, (size_t)MOELAB_EMU_MAX_DYN_SHARED));
  }
  Launch launch;
  launch.cfg = cfg;
  const uint64_t blocks = (uint64_t)cfg->grid[0] * cfg->grid[1] * cfg->grid[2];
  uint64_t n_os = cfg->os_threads == 0 ? 1 : cfg->os_threads;
  if (n_os > blocks) n_os = blocks;
  if (n_os <= 1) {
    worker_main(&launch);
  } else {
    std::vector<std::thread> pool;
    for (uint64_t i = 0; i < n_os; ++i) pool.emplace_back(worker_main, &launch);
    for (std::thread &t : pool) t.join();
  }
  if (launch.failed.load()) return bad(launch.error);
  return 0;
}

uint3 moelab_emu_thread_idx(void) { return need_worker("threadIdx")->current->tid; }
uint3 moelab_emu_block_idx(void) { return need_worker("blockIdx")->block; }
dim3 moelab_emu_block_dim(void) {
  const uint32_t *b = need_worker("blockDim")->launch->cfg->block;
  return dim3{b[0], b[1], b[2]};
}
dim3 moelab_emu_grid_dim(void) {
  const uint32_t *g = need_worker("gridDim")->launch->cfg->grid;
  return dim3{g[0], g[1], g[2]};
}

void moelab_emu_syncthreads(const char *file, int line) {
  Worker *w = need_worker("__syncthreads");
  if (w->barrier_count == 0) {
    w->barrier_file = file;
    w->barrier_line = line;
  } else if (line != w->barrier_line || strcmp(file, w->barrier_file) != 0) {
    fail_fiber(w, format("barrier mismatch in %s: thread %s waits at __syncthreads() at %s:%d "
                         "while others wait at %s:%d",
                         where(w).c_str(), thread_name(w->current->tid).c_str(), file, line,
                         w->barrier_file, w->barrier_line));
  }
  if (++w->barrier_count == w->n_threads) {
    // The last one in releases everyone; a new race epoch begins.
    w->barrier_count = 0;
    ++w->epoch;
    for (Fiber &f : w->fibers) {
      if (f.state == State::Barrier) f.state = State::Runnable;
    }
    return;
  }
  block_current(w, State::Barrier, file, line);
}

uint64_t moelab_emu_warp(int kind, uint32_t mask, uint64_t value, int arg, int width,
                         const char *file, int line) {
  Worker *w = need_worker("a warp intrinsic");
  Fiber *f = w->current;
  const uint32_t warp = f->linear / 32, lane = f->linear % 32;
  const uint32_t first = warp * 32;
  const uint32_t lanes = w->n_threads - first < 32 ? w->n_threads - first : 32;
  const uint32_t existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  uint32_t live = 0;
  for (uint32_t l = 0; l < lanes; ++l) {
    if (w->fibers[first + l].state != State::Done) live |= 1u << l;
  }
  if (kind == MOELAB_EMU_ACTIVEMASK) return live;
  const char *name = kind == MOELAB_EMU_SHFL_IDX    ? "__shfl_sync"
                     : kind == MOELAB_EMU_SHFL_XOR  ? "__shfl_xor_sync"
                     : kind == MOELAB_EMU_SHFL_DOWN ? "__shfl_down_sync"
                     : kind == MOELAB_EMU_SHFL_UP   ? "__shfl_up_sync"
                     : kind == MOELAB_EMU_SYNCWARP  ? "__syncwarp"
                                                    : "__ballot_sync";
  if ((mask & (1u << lane)) == 0) {
    fail_fiber(w, format("warp mask error in %s: thread %s calls %s at %s:%d with mask 0x%08x, "
                         "which leaves out its own lane %u",
                         where(w).c_str(), thread_name(f->tid).c_str(), name, file, line, mask,
                         lane));
  }
  if ((mask & ~existing) != 0) {
    fail_fiber(w, format("warp mask error in %s: %s at %s:%d names lanes 0x%08x of warp %u, "
                         "which has only %u threads (blockDim is not a multiple of 32)",
                         where(w).c_str(), name, file, line, mask & ~existing, warp, lanes));
  }
  if ((mask & ~live) != 0) {
    fail_fiber(w, format("barrier deadlock in %s: %s at %s:%d waits for lanes 0x%08x of warp "
                         "%u, which have exited",
                         where(w).c_str(), name, file, line, mask & ~live, warp));
  }
  if (kind <= MOELAB_EMU_SHFL_UP && (width <= 0 || width > 32 || (width & (width - 1)) != 0)) {
    fail_fiber(w, format("%s at %s:%d in %s: width %d is not a power of two <= 32", name, file,
                         line, where(w).c_str(), width));
  }
  WarpSync &ws = w->warps[warp];
  if (ws.arrived == 0) {
    ws.kind = kind;
    ws.mask = mask;
    ws.file = file;
    ws.line = line;
    ws.width = width;
  } else if (ws.kind != kind || ws.mask != mask || ws.line != line ||
             strcmp(ws.file, file) != 0) {
    fail_fiber(w, format("warp divergence in %s: thread %s calls %s at %s:%d (mask 0x%08x) while "
                         "other lanes of warp %u wait in another collective at %s:%d (mask "
                         "0x%08x)",
                         where(w).c_str(), thread_name(f->tid).c_str(), name, file, line, mask,
                         warp, ws.file, ws.line, ws.mask));
  }
  ws.values[lane] = value;
  ws.args[lane] = arg;
  ws.arrived |= 1u << lane;
  if (ws.arrived != mask) {
    block_current(w, State::Warp, file, line);
    return ws.results[lane];
  }
  // The last lane in computes every lane's result, then releases them.
  complete_warp(w, ws, warp, name, file, line);
  ws.arrived = 0;
  for (uint32_t l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) != 0 && l != lane) w->fibers[first + l].state = State::Runnable;
  }
  return ws.results[lane];
}

uint64_t moelab_emu_atomic(int op, void *addr, int bytes, uint64_t value, uint64_t compare,
                           const char *file, int line) {
  Worker *w = need_worker("an atomic");
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  if (a % (uintptr_t)bytes != 0) {
    fail_fiber(w, format("misaligned atomic in %s at %s:%d: %d-byte atomic at %p", where(w).c_str(),
                         file, line, bytes, addr));
  }
  // Bounds only: atomics never race with each other (shared words touched by atomics are not
  // entered in the race shadow).
  Fiber *f = w->current;
  const bool in_shared = a >= w->tls_lo && a + bytes <= w->tls_hi;
  if (!in_shared) {
    bool inside = false;
    for (size_t i = 0; i < w->launch->cfg->n_buffers && !inside; ++i) {
      const MoelabEmuBuffer &b = w->launch->cfg->buffers[i];
      const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
      inside = a >= lo && a + bytes <= lo + b.bytes;
    }
    if (!inside) {
      fail_fiber(w, format("global out of bounds in %s: thread %s's atomic at %s:%d targets %p, "
                           "outside every buffer of the launch",
                           where(w).c_str(), thread_name(f->tid).c_str(), file, line, addr));
    }
  }
  if (bytes == 4) {
    uint32_t *p = static_cast<uint32_t *>(addr);
    const uint32_t v = (uint32_t)value;
    uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (true) {
      uint32_t next = old;
      switch (op) {
        case MOELAB_EMU_ATOMIC_ADD_U: next = old + v; break;
        case MOELAB_EMU_ATOMIC_ADD_F32: {
          float x, y;
          memcpy(&x, &old, 4);
          memcpy(&y, &v, 4);
          x += y;
          memcpy(&next, &x, 4);
          break;
        }
        case MOELAB_EMU_ATOMIC_MAX_U: next = old > v ? old : v; break;
        case MOELAB_EMU_ATOMIC_MAX_I: next = (int32_t)old > (int32_t)v ? old : v; break;
        case MOELAB_EMU_ATOMIC_MIN_U: next = old < v ? old : v; break;
        case MOELAB_EMU_ATOMIC_MIN_I: next = (int32_t)old < (int32_t)v ? old : v; break;
        case MOELAB_EMU_ATOMIC_CAS: next = old == (uint32_t)compare ? v : old; break;
        case MOELAB_EMU_ATOMIC_EXCH: next = v; break;
        default: abort();
      }
      if (__atomic_compare_exchange_n(p, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        return old;
      }
    }
  }
  uint64_t *p = static_cast<uint64_t *>(addr);
  uint64_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (true) {
    uint64_t next = old;
    switch (op) {
      case MOELAB_EMU_ATOMIC_ADD_U: next = old + value; break;
      case MOELAB_EMU_ATOMIC_MAX_U: next = old > value ? old : value; break;
      case MOELAB_EMU_ATOMIC_CAS: next = old == compare ? value : old; break;
      default: abort();
    }
    if (__atomic_compare_exchange_n(p, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
      return old;
    }
  }
}

// Half-precision conversions, for the Rust tests of the rounding against the `half` crate.
uint16_t moelab_emu_f32_to_f16(float f) { return __float2half_rn(f).__x; }
uint16_t moelab_emu_f32_to_bf16(float f) { return __float2bfloat16_rn(f).__x; }
float moelab_emu_f16_to_f32(uint16_t h) { return __half2float(__half{h}); }

// ---- ASan instrumentation hooks (kernel mode: calls on every access) -----------------------

#define MOELAB_EMU_ASAN(SIZE)                                                                   \
  void __asan_load##SIZE##_noabort(uintptr_t a) { check_access(a, SIZE, false); }             \
  void __asan_store##SIZE##_noabort(uintptr_t a) { check_access(a, SIZE, true); }             \
  void __asan_load##SIZE(uintptr_t a) { check_access(a, SIZE, false); }                       \
  void __asan_store##SIZE(uintptr_t a) { check_access(a, SIZE, true); }
MOELAB_EMU_ASAN(1)
MOELAB_EMU_ASAN(2)
MOELAB_EMU_ASAN(4)
MOELAB_EMU_ASAN(8)
MOELAB_EMU_ASAN(16)
#undef MOELAB_EMU_ASAN
void __asan_loadN_noabort(uintptr_t a, size_t n) { check_access(a, n, false); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { check_access(a, n, true); }
void __asan_loadN(uintptr_t a, size_t n) { check_access(a, n, false); }
void __asan_storeN(uintptr_t a, size_t n) { check_access(a, n, true); }
void __asan_handle_no_return(void) {}
void __asan_before_dynamic_init(const char *) {}
void __asan_after_dynamic_init(void) {}
void __asan_init(void) {}
void __asan_version_mismatch_check_v8(void) {}

// ---- UBSan handlers -------------------------------------------------------------------------

struct MoelabUbsanLocation {
  const char *file;
  uint32_t line;
  uint32_t column;
};
struct MoelabUbsanType {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct MoelabUbsanBounds {
  MoelabUbsanLocation loc;
  const MoelabUbsanType *array_type;
  const MoelabUbsanType *index_type;
};
}  // extern "C"

namespace {
[[noreturn]] void ubsan_fail(const char *what, const MoelabUbsanLocation *loc,
                             const std::string &detail) {
  Worker *w = tl_worker;
  std::string msg = format("undefined behaviour (%s) at %s:%u:%u%s", what, loc->file, loc->line,
                           loc->column, detail.c_str());
  if (w == nullptr || w->current == nullptr) {
    fprintf(stderr, "moelab emu: %s\n", msg.c_str());
    abort();
  }
  fail_fiber(w, format("%s in %s, thread %s", msg.c_str(), where(w).c_str(),
                       thread_name(w->current->tid).c_str()));
}
}  // namespace

extern "C" {
void __ubsan_handle_out_of_bounds(MoelabUbsanBounds *data, uintptr_t index) {
  const bool is_signed = (data->index_type->info & 1) != 0;
  const std::string idx = is_signed ? format("%lld", (long long)(intptr_t)index)
                                    : format("%llu", (unsigned long long)index);
  ubsan_fail("array index out of bounds", &data->loc,
             format(": index %s of %s", idx.c_str(), data->array_type->name));
}
void __ubsan_handle_out_of_bounds_abort(MoelabUbsanBounds *data, uintptr_t index) {
  __ubsan_handle_out_of_bounds(data, index);
}

#define MOELAB_EMU_UBSAN(NAME, WHAT)                                                         \
  void __ubsan_handle_##NAME(void *data, ...) {                                            \
    ubsan_fail(WHAT, static_cast<MoelabUbsanLocation *>(data), "");                        \
  }                                                                                        \
  void __ubsan_handle_##NAME##_abort(void *data, ...) {                                    \
    ubsan_fail(WHAT, static_cast<MoelabUbsanLocation *>(data), "");                        \
  }
MOELAB_EMU_UBSAN(add_overflow, "signed integer overflow in +")
MOELAB_EMU_UBSAN(sub_overflow, "signed integer overflow in -")
MOELAB_EMU_UBSAN(mul_overflow, "signed integer overflow in *")
MOELAB_EMU_UBSAN(negate_overflow, "signed integer overflow in negation")
MOELAB_EMU_UBSAN(divrem_overflow, "division by zero or overflow")
MOELAB_EMU_UBSAN(shift_out_of_bounds, "shift out of bounds")
MOELAB_EMU_UBSAN(vla_bound_not_positive, "variable-length array bound not positive")
MOELAB_EMU_UBSAN(load_invalid_value, "load of an invalid value")
MOELAB_EMU_UBSAN(nonnull_arg, "null passed as a non-null argument")
MOELAB_EMU_UBSAN(nonnull_return_v1, "null returned from a non-null function")
MOELAB_EMU_UBSAN(pointer_overflow, "pointer arithmetic overflow")
MOELAB_EMU_UBSAN(builtin_unreachable, "unreachable code reached")
MOELAB_EMU_UBSAN(missing_return, "missing return")
MOELAB_EMU_UBSAN(float_cast_overflow, "float to integer conversion overflow")
MOELAB_EMU_UBSAN(invalid_builtin, "invalid builtin argument")
MOELAB_EMU_UBSAN(alignment_assumption, "alignment assumption violated")
#undef MOELAB_EMU_UBSAN

// type_mismatch's data starts with a location pointer-free layout: {loc, type, align, kind}.
void __ubsan_handle_type_mismatch_v1(void *data, uintptr_t ptr) {
  ubsan_fail(ptr == 0 ? "null pointer access" : "misaligned or mistyped access",
             static_cast<MoelabUbsanLocation *>(data),
             format(" (address %p)", reinterpret_cast<void *>(ptr)));
}
void __ubsan_handle_type_mismatch_v1_abort(void *data, uintptr_t ptr) {
  __ubsan_handle_type_mismatch_v1(data, ptr);
}
}  // extern "C"
