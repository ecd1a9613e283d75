#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "stepflow/errors.hpp"
#include "stepflow/options.hpp"

namespace stepflow {
namespace detail {
namespace {

std::string_view trim(std::string_view s) {
  constexpr std::string_view space = " \t\n\r\f\v";
  const auto first = s.find_first_not_of(space);
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(space);
  return s.substr(first, last - first + 1);
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

/// An optional sign and decimal digits within `std::int64_t`, white space around them allowed.
/// `meaning` ends the message for a value that is not an integer (what the variable's values
/// mean).
std::int64_t parse_int64(const char* variable, const std::string& value, std::string_view meaning) {
  std::string_view digits = trim(value);
  bool negative = false;
  if (!digits.empty() && (digits.front() == '+' || digits.front() == '-')) {
    negative = digits.front() == '-';
    digits.remove_prefix(1);
  }
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string_view::npos) {
    throw config_error(fmt::format(
        "{}=\"{}\" is not an integer: expected an optional sign and decimal digits ({})", variable,
        value, meaning));
  }
  // Magnitude limit of std::int64_t: 2^63 - 1, or 2^63 for a negative value.
  const std::uint64_t limit =
      static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) + (negative ? 1 : 0);
  std::uint64_t magnitude = 0;
  for (const char c : digits) {
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (magnitude > (limit - digit) / 10) {
      throw config_error(fmt::format(
          "{}=\"{}\" is out of range: it must fit in a 64-bit signed integer", variable, value));
    }
    magnitude = magnitude * 10 + digit;
  }
  if (!negative) return static_cast<std::int64_t>(magnitude);
  // -2^63 has no positive counterpart: negate one less, then step down.
  return magnitude == 0 ? 0 : -static_cast<std::int64_t>(magnitude - 1) - 1;
}

}  // namespace

std::size_t parse_max_queue_size(const char* variable, const std::string& value) {
  const std::int64_t n = parse_int64(variable, value, "0 or negative means unbounded");
  return n <= 0 ? 0 : static_cast<std::size_t>(n);
}

std::chrono::microseconds parse_linger_us(const char* variable, const std::string& value) {
  const std::int64_t us = parse_int64(variable, value, "microseconds, 0 to 1000000");
  if (us < 0 || us > max_worker_linger.count()) {
    throw config_error(fmt::format("{}=\"{}\" is out of range: expected microseconds from 0 to {}",
                                   variable, value, max_worker_linger.count()));
  }
  return std::chrono::microseconds(us);
}

void check_worker_linger(std::chrono::microseconds linger) {
  if (linger < std::chrono::microseconds::zero() || linger > max_worker_linger) {
    throw config_error(fmt::format(
        "options::worker_linger is {} us: it must be from 0 (leave at once) to {} us (1 s)",
        linger.count(), max_worker_linger.count()));
  }
}

void check_trace_max_events(std::size_t events) {
  if (events > max_trace_events) {
    throw config_error(fmt::format(
        "options::trace_max_events is {}: it must be at most {} (2^32); the trace keeps the most "
        "recent events and counts the rest",
        events, max_trace_events));
  }
}

bool parse_switch(const char* variable, const std::string& value) {
  const std::string v = lower(trim(value));
  if (v.empty() || v == "0" || v == "false" || v == "off" || v == "no") return false;
  if (v == "1" || v == "true" || v == "on" || v == "yes") return true;
  throw config_error(fmt::format(
      "{}=\"{}\" is not a switch: use 1/true/on/yes or 0/false/off/no (or leave it empty)",
      variable, value));
}

}  // namespace detail

options options::from_env() {
  options opts;
  // The only place stepflow reads the environment.
  if (const char* v = std::getenv("LTC_MAX_ASYNC_QUEUE")) {
    opts.max_queue_size = detail::parse_max_queue_size("LTC_MAX_ASYNC_QUEUE", v);
  }
  if (const char* v = std::getenv("STEPFLOW_SYNC")) {
    opts.sync_mode = detail::parse_switch("STEPFLOW_SYNC", v);
  }
  if (const char* v = std::getenv("STEPFLOW_TRACE")) opts.trace_path = v;
  if (const char* v = std::getenv("STEPFLOW_RUN_TIME")) {
    opts.measure_run_time = detail::parse_switch("STEPFLOW_RUN_TIME", v);
  }
  if (const char* v = std::getenv("STEPFLOW_LINGER_US")) {
    opts.worker_linger = detail::parse_linger_us("STEPFLOW_LINGER_US", v);
  }
  return opts;
}

}  // namespace stepflow
