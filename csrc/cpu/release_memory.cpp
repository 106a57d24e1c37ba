// moe_kernels::cpu_release_memory: gives the kept weight-gradient mappings (huge_pages.h MappingPool) back.
#include "../ops.h"
#include "huge_pages.h"

namespace moe_kernels {

int64_t cpu_release_memory() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return static_cast<int64_t>(cpu::MappingPool::instance().release());
#else
  return 0;
#endif
}

}  // namespace moe_kernels
