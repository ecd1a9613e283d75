// options: defaults and the strict parsing of environment values.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

namespace stepflow {
namespace {

// Sets an environment variable for one test and restores the previous state afterwards.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~scoped_env() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(Options, DefaultsMatchTorch) {
  const options o;
  EXPECT_EQ(o.max_queue_size, 100u);
  EXPECT_FALSE(o.sync_mode);
  EXPECT_EQ(o.default_device, "default");
  EXPECT_FALSE(o.measure_run_time);  // issue 4: it costs more than 10% of small steps
  EXPECT_EQ(o.worker_linger, std::chrono::microseconds(100));
}

TEST(Options, FromEnvWithNothingSetGivesTheDefaults) {
  scoped_env q("LTC_MAX_ASYNC_QUEUE", nullptr);
  scoped_env s("STEPFLOW_SYNC", nullptr);
  const options o = options::from_env();
  EXPECT_EQ(o.max_queue_size, 100u);
  EXPECT_FALSE(o.sync_mode);
}

TEST(Options, MaxQueueSizeAcceptsSignedDecimalIntegers) {
  using detail::parse_max_queue_size;
  EXPECT_EQ(parse_max_queue_size("V", "7"), 7u);
  EXPECT_EQ(parse_max_queue_size("V", "  250\t"), 250u);
  EXPECT_EQ(parse_max_queue_size("V", "+5"), 5u);
  EXPECT_EQ(parse_max_queue_size("V", "0"), 0u);   // unbounded
  EXPECT_EQ(parse_max_queue_size("V", "-1"), 0u);  // unbounded, as in torch
  EXPECT_EQ(parse_max_queue_size("V", "-9223372036854775808"), 0u);
  EXPECT_EQ(parse_max_queue_size("V", "9223372036854775807"), static_cast<std::size_t>(INT64_MAX));
}

TEST(Options, MaxQueueSizeRejectsAnythingElseNamingVariableAndValue) {
  for (const char* bad : {"abc", "1e99", "", "   ", "12abc", "+", "-", "1.5", "0x10", "1 2"}) {
    try {
      detail::parse_max_queue_size("LTC_MAX_ASYNC_QUEUE", bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const config_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("LTC_MAX_ASYNC_QUEUE"), std::string::npos) << what;
      EXPECT_NE(what.find(std::string("\"") + bad + "\""), std::string::npos) << what;
      EXPECT_NE(what.find("not an integer"), std::string::npos) << what;
    }
  }
}

TEST(Options, MaxQueueSizeRejectsValuesBeyondInt64) {
  for (const char* bad : {"99999999999999999999", "9223372036854775808", "-9223372036854775809"}) {
    try {
      detail::parse_max_queue_size("LTC_MAX_ASYNC_QUEUE", bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const config_error& e) {
      EXPECT_NE(std::string(e.what()).find("out of range"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

TEST(Options, SwitchAcceptsTheDocumentedSpellings) {
  using detail::parse_switch;
  for (const char* yes : {"1", "true", "on", "yes", "TRUE", " Yes "}) {
    EXPECT_TRUE(parse_switch("STEPFLOW_SYNC", yes)) << yes;
  }
  for (const char* no : {"0", "false", "off", "no", "", "  ", "OFF"}) {
    EXPECT_FALSE(parse_switch("STEPFLOW_SYNC", no)) << no;
  }
}

TEST(Options, SwitchRejectsMaybe) {
  try {
    detail::parse_switch("STEPFLOW_SYNC", "maybe");
    ADD_FAILURE() << "accepted maybe";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("STEPFLOW_SYNC=\"maybe\""), std::string::npos) << e.what();
  }
}

TEST(Options, FromEnvReadsBothVariables) {
  scoped_env q("LTC_MAX_ASYNC_QUEUE", "3");
  scoped_env s("STEPFLOW_SYNC", "on");
  const options o = options::from_env();
  EXPECT_EQ(o.max_queue_size, 3u);
  EXPECT_TRUE(o.sync_mode);
}

TEST(Options, FromEnvRunTimeSwitchTurnsRunTimeOn) {
  {
    scoped_env r("STEPFLOW_RUN_TIME", nullptr);
    EXPECT_FALSE(options::from_env().measure_run_time);
  }
  for (const char* on : {"1", "on", "TRUE", " Yes "}) {
    scoped_env r("STEPFLOW_RUN_TIME", on);
    EXPECT_TRUE(options::from_env().measure_run_time) << '"' << on << '"';
  }
  for (const char* off : {"0", "off", "no", " False ", ""}) {
    scoped_env r("STEPFLOW_RUN_TIME", off);
    EXPECT_FALSE(options::from_env().measure_run_time) << '"' << off << '"';
  }
}

TEST(Options, FromEnvRunTimeSwitchRejectsMaybeNamingTheVariable) {
  scoped_env r("STEPFLOW_RUN_TIME", "maybe");
  try {
    scheduler s;
    ADD_FAILURE() << "accepted maybe";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("STEPFLOW_RUN_TIME=\"maybe\""), std::string::npos)
        << e.what();
  }
}

TEST(Options, ATraceLargerThanTwoToThe32EventsIsRefusedAtConstruction) {
  options o;
  o.trace_max_events = std::numeric_limits<std::size_t>::max();
  try {
    scheduler s(o);
    ADD_FAILURE() << "accepted trace_max_events = SIZE_MAX";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("options::trace_max_events is 18446744073709551615"),
              std::string::npos)
        << e.what();
  }
  o.trace_max_events = detail::max_trace_events;
  EXPECT_NO_THROW(scheduler{o}) << "2^32 itself is allowed (without a trace path, nothing is kept)";
}

TEST(Options, FromEnvNegativeMeansUnbounded) {
  scoped_env q("LTC_MAX_ASYNC_QUEUE", "-1");
  EXPECT_EQ(options::from_env().max_queue_size, 0u);
}

TEST(Options, BadEnvironmentFailsTheSchedulerConstructionNotLater) {
  for (const char* bad : {"abc", "-x", "1e99", "99999999999999999999", ""}) {
    scoped_env q("LTC_MAX_ASYNC_QUEUE", bad);
    EXPECT_THROW(scheduler s, config_error) << bad;
  }
  scoped_env q("LTC_MAX_ASYNC_QUEUE", nullptr);
  scoped_env s("STEPFLOW_SYNC", "maybe");
  EXPECT_THROW(scheduler s2, config_error);
}

TEST(Options, LingerAcceptsMicrosecondsFromZeroToOneSecond) {
  using detail::parse_linger_us;
  using std::chrono::microseconds;
  EXPECT_EQ(parse_linger_us("V", "0"), microseconds(0));
  EXPECT_EQ(parse_linger_us("V", " 5000\t"), microseconds(5000));
  EXPECT_EQ(parse_linger_us("V", "+250"), microseconds(250));
  EXPECT_EQ(parse_linger_us("V", "-0"), microseconds(0));
  EXPECT_EQ(parse_linger_us("V", "1000000"), microseconds(1'000'000));
}

TEST(Options, LingerRejectsNonIntegersAndValuesOutOfRangeNamingVariableAndValue) {
  struct bad_value {
    const char* text;
    const char* reason;
  };
  for (const bad_value bad : {bad_value{"abc", "not an integer"},
                              {"", "not an integer"},
                              {"1.5", "not an integer"},
                              {"5ms", "not an integer"},
                              {"-1", "out of range"},
                              {"1000001", "out of range"},
                              {"99999999999999999999", "out of range"}}) {
    try {
      detail::parse_linger_us("STEPFLOW_LINGER_US", bad.text);
      ADD_FAILURE() << "accepted \"" << bad.text << "\"";
    } catch (const config_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::string("STEPFLOW_LINGER_US=\"") + bad.text + "\""),
                std::string::npos)
          << what;
      EXPECT_NE(what.find(bad.reason), std::string::npos) << what;
    }
  }
}

TEST(Options, FromEnvReadsTheLinger) {
  {
    scoped_env l("STEPFLOW_LINGER_US", nullptr);
    EXPECT_EQ(options::from_env().worker_linger, std::chrono::microseconds(100));
  }
  scoped_env l("STEPFLOW_LINGER_US", "5000");
  EXPECT_EQ(options::from_env().worker_linger, std::chrono::microseconds(5000));
}

TEST(Options, ALingerOutOfRangeFailsTheSchedulerConstructionNamingTheOption) {
  for (const std::chrono::microseconds bad :
       {std::chrono::microseconds(-1), std::chrono::microseconds(1'000'001),
        std::chrono::microseconds(std::chrono::hours(1))}) {
    options o;
    o.worker_linger = bad;
    try {
      scheduler s(o);
      ADD_FAILURE() << "accepted " << bad.count() << " us";
    } catch (const config_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("options::worker_linger is " + std::to_string(bad.count()) + " us"),
                std::string::npos)
          << what;
    }
  }
  for (const std::chrono::microseconds good :
       {std::chrono::microseconds(0), std::chrono::microseconds(1'000'000)}) {
    options o;
    o.worker_linger = good;
    EXPECT_NO_THROW(scheduler s(o)) << good.count() << " us";
  }
}

TEST(Options, ConfigErrorIsAStepflowError) {
  scoped_env s("STEPFLOW_SYNC", "maybe");
  EXPECT_THROW(options::from_env(), error);
  EXPECT_THROW(options::from_env(), std::runtime_error);
}

}  // namespace
}  // namespace stepflow
