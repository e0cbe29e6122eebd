// Errors raised by the slattn core.
//
// Every public entry point validates its arguments and throws slattn::Error
// with a message that names the offending argument and the allowed values.
// Error derives from std::invalid_argument so that bindings (nanobind maps it
// to ValueError) surface it as a bad-argument error, never as a crash.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

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
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}
}  // namespace detail

}  // namespace slattn

// SLATTN_CHECK(condition, message parts...): throws slattn::Error when false.
#define SLATTN_CHECK(condition, ...)                                   \
  do {                                                                 \
    if (!(condition)) throw ::slattn::Error(::slattn::detail::concat(__VA_ARGS__)); \
  } while (false)
