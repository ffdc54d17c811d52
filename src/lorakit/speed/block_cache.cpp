// PyTorch's CPU allocator with a cache of freed blocks, kept by size: see speed/allocator.py for why and the numbers.
//
// A training step allocates and frees the same sizes layer after layer (activations, products' outputs,
// temporaries). glibc serves each block of 1 MiB or more with a fresh mmap (lorakit fixes its threshold there, to
// keep the heap from fragmenting), so every such tensor costs a page fault per 4 KiB when it is first written. Here
// a freed block of at least MIN_BYTES waits in a list for its size (rounded up to 64 KiB) and the next request of
// that size takes it, already mapped. The blocks held are bounded by `limit` bytes: past it the oldest freed block
// is given back to the system. Smaller blocks go to malloc as before (the heap serves them without faults).
//
// Built by kernels/native.py against the torch it is loaded into; lorakit_block_cache_install() makes it the CPU
// allocator (c10::SetCPUAllocator). Tensors made before keep their own deleter; blocks it made are freed by it.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <new>
#include <pthread.h>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t MIN_BYTES = size_t(1) << 20;
constexpr size_t ROUND = size_t(1) << 16;
constexpr size_t ALIGNMENT = 64;

struct Block {
    void* p;
    size_t size;
};

struct Cache {
    std::mutex mutex;
    std::unordered_map<void*, size_t> sizes;  // every block of a cached size it handed out or holds -> its size
    std::list<Block> free_order;              // the free blocks, the oldest first
    std::unordered_map<size_t, std::vector<std::list<Block>::iterator>> free_by_size;  // newest last
    size_t held = 0, limit = 0;
    uint64_t hits = 0, misses = 0;

    void drop_oldest() {  // caller holds the mutex
        const Block b = free_order.front();
        auto& list = free_by_size[b.size];
        for (size_t i = 0; i < list.size(); i++) {
            if (list[i]->p != b.p) continue;
            list[i] = list.back();
            list.pop_back();
            break;
        }
        free_order.pop_front();
        sizes.erase(b.p);
        held -= b.size;
        std::free(b.p);
    }
};

void lock_for_fork();
void unlock_in_parent();
void fresh_in_child();

Cache& cache() {
    static Cache* c = [] {
        pthread_atfork(lock_for_fork, unlock_in_parent, fresh_in_child);
        return new Cache();  // never destroyed: tensors may be freed during interpreter shutdown
    }();
    return *c;
}

// fork() waits for the lock, so the child's copy of the lists is never half-updated; the child gets a fresh mutex
// (the parent's thread that locked it does not exist there).
void lock_for_fork() { cache().mutex.lock(); }
void unlock_in_parent() { cache().mutex.unlock(); }
void fresh_in_child() { new (&cache().mutex) std::mutex(); }

void release(void* p) {
    if (p == nullptr) return;
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.sizes.find(p);
    if (it == c.sizes.end()) {  // a small block
        std::free(p);
        return;
    }
    const size_t size = it->second;
    if (size > c.limit) {
        c.sizes.erase(it);
        std::free(p);
        return;
    }
    while (c.held + size > c.limit && c.held > 0) c.drop_oldest();
    c.free_by_size[size].push_back(c.free_order.insert(c.free_order.end(), Block{p, size}));
    c.held += size;
}

void* obtain(size_t n) {
    Cache& c = cache();
    if (n < MIN_BYTES) {
        void* p = nullptr;
        if (posix_memalign(&p, ALIGNMENT, n == 0 ? 1 : n) != 0) return nullptr;
        return p;
    }
    const size_t size = (n + ROUND - 1) / ROUND * ROUND;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        auto it = c.free_by_size.find(size);
        if (it != c.free_by_size.end() && !it->second.empty()) {
            void* p = it->second.back()->p;
            c.free_order.erase(it->second.back());
            it->second.pop_back();
            c.held -= size;
            c.hits++;
            return p;
        }
        c.misses++;
    }
    void* p = nullptr;
    if (posix_memalign(&p, ALIGNMENT, size) != 0) {
        std::lock_guard<std::mutex> lock(c.mutex);
        while (c.held > 0) c.drop_oldest();  // out of memory: give back every free block, then try once more
        if (posix_memalign(&p, ALIGNMENT, size) != 0) return nullptr;
    }
    std::lock_guard<std::mutex> lock(c.mutex);
    c.sizes[p] = size;
    return p;
}

struct BlockCacheAllocator final : c10::Allocator {
    c10::DataPtr allocate(size_t n) override {
        void* p = obtain(n);
        if (p == nullptr) throw std::bad_alloc();
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DeleterFnPtr raw_deleter() const override { return &release; }
    void copy_data(void* dest, const void* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }
};

BlockCacheAllocator* installed = nullptr;

}  // namespace

extern "C" {

// Make the cache PyTorch's CPU allocator, holding at most `limit` bytes of free blocks; returns 0 (or 1 if it
// already is, with the new limit).
int lorakit_block_cache_install(uint64_t limit) {
    Cache& c = cache();
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        c.limit = limit;
        while (c.held > c.limit) c.drop_oldest();
    }
    if (installed != nullptr) return 1;
    installed = new BlockCacheAllocator();
    c10::SetCPUAllocator(installed, /*priority=*/1);
    return 0;
}

// Give every free block back to the system now.
void lorakit_block_cache_flush() {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    while (c.held > 0) c.drop_oldest();
}

// held bytes, hits, misses
void lorakit_block_cache_stats(uint64_t* out) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    out[0] = c.held;
    out[1] = c.hits;
    out[2] = c.misses;
}
}
