// options::report_to_stderr: what stepflow writes to stderr (the shutdown report, the notice that
// a trace went to a numbered sibling) appears when it is true and not at all when it is false;
// options::on_shutdown_report gets the report either way.

#include <stepflow/stepflow.hpp>

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>

#include "support/test_options.hpp"

namespace stepflow {
namespace {

options with_stderr(bool on) {
  options o = testing::quiet_options();
  o.report_to_stderr = on;
  return o;
}

std::filesystem::path temp_file(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         (name + "-" + std::to_string(::getpid()) + ".json");
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The parameter is options::report_to_stderr.
class ReportToStderr : public ::testing::TestWithParam<bool> {};

TEST_P(ReportToStderr, DecidesWhetherTheShutdownReportIsWrittenButNotWhetherItIsMade) {
  std::optional<shutdown_report> seen;
  ::testing::internal::CaptureStderr();
  {
    options o = with_stderr(GetParam());
    o.on_shutdown_report = [&](const shutdown_report& r) { seen = r; };
    scheduler s(o);
    device_context& bad = s.device("bad");
    bad.add_step_closure(run_async, [] { throw std::runtime_error("nobody looked at this"); });
    bad.run_step_closures();
    s.device("idle").add_step_closure([] {});  // added after its last step end: never runs
  }
  const std::string text = ::testing::internal::GetCapturedStderr();
  if (GetParam()) {
    EXPECT_TRUE(contains(text, "device 'bad'")) << text;
    EXPECT_TRUE(contains(text, "nobody looked at this")) << text;
    EXPECT_TRUE(contains(text, "device 'idle': 1 closure added after its last step end never ran"))
        << text;
  } else {
    EXPECT_EQ(text, "");
  }
  ASSERT_TRUE(seen.has_value()) << "the callback did not get the report";
  ASSERT_EQ(seen->devices.size(), 2u);
  EXPECT_EQ(seen->devices[0].device, "bad");
  EXPECT_TRUE(seen->devices[0].unreported_error);
  EXPECT_EQ(seen->devices[1].device, "idle");
  EXPECT_EQ(seen->devices[1].never_run, 1u);
}

TEST_P(ReportToStderr, DecidesWhetherATraceMovedToANumberedSiblingIsAnnounced) {
  const std::filesystem::path path = temp_file("stepflow-stderr-trace");
  const std::string sibling = path.string().substr(0, path.string().size() - 5) + ".2.json";
  options o = with_stderr(GetParam());
  o.trace_path = path.string();
  ::testing::internal::CaptureStderr();
  std::string first_path;
  std::string second_path;
  {
    scheduler first(o);
    scheduler second(o);
    first_path = first.trace_path();
    second_path = second.trace_path();
  }
  const std::string text = ::testing::internal::GetCapturedStderr();
  std::error_code ignored;
  std::filesystem::remove(path, ignored);
  std::filesystem::remove(sibling, ignored);
  EXPECT_EQ(first_path, path.string());
  EXPECT_EQ(second_path, sibling) << "the trace moves to the sibling either way";
  if (GetParam()) {
    EXPECT_TRUE(contains(text, sibling)) << text;
  } else {
    EXPECT_EQ(text, "");
  }
}

INSTANTIATE_TEST_SUITE_P(Stderr, ReportToStderr, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "On" : "Off"; });

// Off, the destructor writes nothing to stderr even with everything to say at once: a shutdown
// report, a trace in a numbered sibling, and a final trace write that fails.
TEST(ReportToStderrOff, TheDestructorWritesNothingAtAllToStderr) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("stepflow-stderr-dir-" + std::to_string(::getpid()));
  std::filesystem::create_directory(dir);
  const std::filesystem::path path = dir / "trace.json";
  options o = with_stderr(false);
  o.trace_path = path.string();
  ::testing::internal::CaptureStderr();
  {
    scheduler first(o);
    scheduler second(o);  // its trace goes to the sibling
    for (scheduler* s : {&first, &second}) {
      device_context& d = s->device("d");
      d.add_step_closure(run_async, [] { throw std::runtime_error("unreported"); });
      d.run_step_closures();
      d.add_step_closure([] {});  // never runs
    }
    std::filesystem::remove_all(dir);  // the final trace writes fail
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace stepflow
