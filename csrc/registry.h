// Static registration of pybind11 bindings: each source file of an op family
// registers its own functions, so adding a family never edits a shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "codes.h"

namespace pyfici {

using Registrar = void (*)(pybind11::module_&);
std::vector<Registrar>& registrars();
void register_all(pybind11::module_& m);

struct AutoRegister {
  explicit AutoRegister(Registrar r) { registrars().push_back(r); }
};

// m.DTYPE_CODES = {"float32": 0, ...}, m.METRIC_CODES = {"sqeuclidean": 0, ...}
void export_codes(pybind11::module_& m);

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace pyfici

#define PYFICI_CAT2(a, b) a##b
#define PYFICI_CAT(a, b) PYFICI_CAT2(a, b)
// Usage: PYFICI_REGISTER(m) { m.def(...); }
#define PYFICI_REGISTER(m)                                                          \
  static void PYFICI_CAT(pyfici_register_, __LINE__)(pybind11::module_ & m);       \
  static ::pyfici::AutoRegister PYFICI_CAT(pyfici_autoreg_, __LINE__)(              \
      &PYFICI_CAT(pyfici_register_, __LINE__));                                     \
  static void PYFICI_CAT(pyfici_register_, __LINE__)(pybind11::module_ & m)
