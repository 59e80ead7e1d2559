// Static registration of pybind11 bindings: each source file of an op family
// registers its own functions, so adding a family never edits a shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace pyfici {

using Registrar = void (*)(pybind11::module_&);
std::vector<Registrar>& registrars();
void register_all(pybind11::module_& m);

struct AutoRegister {
  explicit AutoRegister(Registrar r) { registrars().push_back(r); }
};

// dtype codes shared by Python (pyfici/_native.py) and native code
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kInt64 = 4, kInt32 = 5, kUInt8 = 6, kBool = 7 };

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
