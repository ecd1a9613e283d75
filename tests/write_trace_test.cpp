// scheduler::write_trace(): the timeline trace written on demand, while the scheduler runs, as a
// whole Chrome trace-event document; a no-op without a trace; config_error when it cannot be
// written.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>

#include "support/test_options.hpp"

namespace stepflow {
namespace {

using nlohmann::json;

// A fresh directory under the temporary directory, unique per test, removed afterwards.
class scratch_dir {
 public:
  scratch_dir() {
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    path_ = std::filesystem::temp_directory_path() /
            ("stepflow-write-trace-" + name + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directory(path_);
  }
  ~scratch_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;

  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// The file at `path`, parsed. Throws (failing the test) unless it is one valid JSON document.
json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("no file " + path.string());
  std::stringstream text;
  text << in.rdbuf();
  return json::parse(text.str());
}

// Checks the shape chrome://tracing and Perfetto read: an object whose "traceEvents" is an array
// of events, each with a phase, a name, a process and a thread; complete events ("X") with a
// start and a duration.
void expect_chrome_trace(const json& trace) {
  ASSERT_TRUE(trace.is_object()) << trace.dump();
  ASSERT_TRUE(trace.contains("traceEvents")) << trace.dump();
  ASSERT_TRUE(trace.at("traceEvents").is_array()) << trace.dump();
  for (const json& e : trace.at("traceEvents")) {
    ASSERT_TRUE(e.is_object()) << e.dump();
    EXPECT_TRUE(e.contains("ph") && e.at("ph").is_string()) << e.dump();
    EXPECT_TRUE(e.contains("name") && e.at("name").is_string()) << e.dump();
    EXPECT_TRUE(e.contains("pid")) << e.dump();
    EXPECT_TRUE(e.contains("tid")) << e.dump();
    if (e.value("ph", "") == "X") {
      EXPECT_TRUE(e.contains("ts") && e.at("ts").is_number()) << e.dump();
      EXPECT_TRUE(e.contains("dur") && e.at("dur").is_number()) << e.dump();
    }
  }
}

// The complete events of `trace`: (name, category, step) for each.
std::multiset<std::tuple<std::string, std::string, std::uint64_t>> closures_in(const json& trace) {
  std::multiset<std::tuple<std::string, std::string, std::uint64_t>> out;
  for (const json& e : trace.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    out.emplace(e.at("name").get<std::string>(), e.at("cat").get<std::string>(),
                e.at("args").at("step").get<std::uint64_t>());
  }
  return out;
}

TEST(WriteTrace, WritesTheClosuresRecordedSoFarWhileTheSchedulerRuns) {
  const scratch_dir dir;
  const std::filesystem::path path = dir.path() / "trace.json";
  options o = testing::quiet_options();
  o.trace_path = path.string();
  scheduler s(o);
  ASSERT_EQ(s.trace_path(), path.string());
  device_context& d = s.device("gpu0");

  d.add_step_closure(labeled("first_sync", [] {}));
  d.add_step_closure(run_async, labeled("first_async", [] {}));
  d.run_step_closures();
  d.flush();  // the device's flush waits for the async closure; only the scheduler's writes
  s.write_trace();
  using event = std::tuple<std::string, std::string, std::uint64_t>;
  {
    const json trace = read_json(path);
    expect_chrome_trace(trace);
    EXPECT_EQ(closures_in(trace),
              (std::multiset<event>{{"first_sync", "sync", 1}, {"first_async", "async", 1}}))
        << trace.dump();
  }

  // Each write replaces the file with every event so far: the second step's with the first's.
  d.add_step_closure(labeled("second_sync", [] {}));
  d.run_step_closures();
  s.write_trace();
  {
    const json trace = read_json(path);
    expect_chrome_trace(trace);
    EXPECT_EQ(closures_in(trace), (std::multiset<event>{{"first_sync", "sync", 1},
                                                        {"first_async", "async", 1},
                                                        {"second_sync", "sync", 2}}))
        << trace.dump();
  }
}

TEST(WriteTrace, WithoutATracePathDoesNothing) {
  const scratch_dir dir;
  const std::filesystem::path previous = std::filesystem::current_path();
  // A trace file without a path could only land in the working directory: watch that one.
  std::filesystem::current_path(dir.path());
  {
    scheduler s(testing::quiet_options());
    EXPECT_EQ(s.trace_path(), "");
    device_context& d = s.device("gpu0");
    d.add_step_closure(labeled("sync", [] {}));
    d.add_step_closure(run_async, labeled("async", [] {}));
    d.run_step_closures();
    d.flush();
    EXPECT_NO_THROW(s.write_trace());
    EXPECT_NO_THROW(s.write_trace());
  }
  std::filesystem::current_path(previous);
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "a scheduler without a trace wrote a file";
}

TEST(WriteTrace, AFileThatCannotBeWrittenAnyMoreThrowsConfigErrorNamingIt) {
  const scratch_dir dir;
  const std::filesystem::path sub = dir.path() / "gone";
  std::filesystem::create_directory(sub);
  const std::filesystem::path path = sub / "trace.json";
  options o = testing::quiet_options();  // the destructor's failed final write stays off stderr
  o.trace_path = path.string();
  scheduler s(o);
  device_context& d = s.device("gpu0");
  d.add_step_closure(labeled("sync", [] {}));
  d.run_step_closures();
  // The trace's directory disappears after the file was created: nowhere left to write it.
  std::filesystem::remove_all(sub);
  try {
    s.write_trace();
    ADD_FAILURE() << "write_trace() did not report that it could not write " << path;
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace stepflow
