// Errors raised by the slattn core.
//
// Every public entry point validates its arguments and throws slattn::Error
// with a message that names the offending argument and the allowed values.
// Error derives from std::invalid_argument so that bindings (nanobind maps it
// to ValueError) surface it as a bad-argument error, never as a crash.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace slattn {

class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& message) : std::invalid_argument("slattn: " + message) {}
};

// Raised when a valid request needs a backend this build or machine lacks.
class Unsupported : public std::runtime_error {
 public:
  explicit Unsupported(const std::string& message) : std::runtime_error("slattn: " + message) {}
};

namespace detail {

// Message building without iostreams: formatting through std::ostream was
// seen to crash in extensions linked against a static libstdc++ beside
// PyTorch's, and an error path must never crash.
inline void append(std::string& out, std::string_view text) { out.append(text); }
inline void append(std::string& out, const char* text) { out.append(text); }
inline void append(std::string& out, char c) { out.push_back(c); }
template <typename Number, std::enable_if_t<std::is_arithmetic_v<Number>, int> = 0>
void append(std::string& out, Number value) {
  char buffer[64];
  if constexpr (std::is_same_v<Number, bool>) {
    out.append(value ? "true" : "false");
    return;
  } else if constexpr (std::is_floating_point_v<Number>) {
    std::snprintf(buffer, sizeof(buffer), "%.6g", static_cast<double>(value));
  } else if constexpr (std::is_signed_v<Number>) {
    std::snprintf(buffer, sizeof(buffer), "%lld", static_cast<long long>(value));
  } else {
    std::snprintf(buffer, sizeof(buffer), "%llu", static_cast<unsigned long long>(value));
  }
  out.append(buffer);
}

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace detail

}  // namespace slattn

// SLATTN_CHECK(condition, message parts...): throws slattn::Error when false.
#define SLATTN_CHECK(condition, ...)                                   \
  do {                                                                 \
    if (!(condition)) throw ::slattn::Error(::slattn::detail::concat(__VA_ARGS__)); \
  } while (false)
