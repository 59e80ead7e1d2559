#include "registry.h"

namespace pyfici {
std::vector<Registrar>& registrars() {
  static std::vector<Registrar> r;
  return r;
}
void register_all(pybind11::module_& m) {
  for (auto r : registrars()) r(m);
}
}  // namespace pyfici
