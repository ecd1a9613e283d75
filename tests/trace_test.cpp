// trace_recorder: the Chrome trace-event JSON it writes (parsed back with nlohmann::json), its
// tracks, escaping, bounded ring, concurrent recording and file errors.

#include <stepflow/errors.hpp>
#include <stepflow/metrics.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "trace_recorder.hpp"

namespace stepflow {
namespace {

using detail::trace_recorder;
using nlohmann::json;

// A file name in the temporary directory, unique per test, removed afterwards.
class TraceFile : public testing::Test {
 protected:
  void SetUp() override {
    std::string name = testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(name.begin(), name.end(), '/', '_');  // parametrised tests: "Name/0"
    path_ = (std::filesystem::temp_directory_path() /
             ("stepflow-trace-" + name + "-" + std::to_string(::getpid()) + ".json"))
                .string();
  }
  void TearDown() override { std::filesystem::remove(path_); }

  json read() const {
    std::ifstream in(path_);
    std::stringstream text;
    text << in.rdbuf();
    // Throws (failing the test) unless the whole file is one valid JSON document.
    return json::parse(text.str());
  }

  static std::vector<json> events_of(const json& trace, const std::string& phase) {
    std::vector<json> out;
    for (const json& e : trace.at("traceEvents")) {
      if (e.at("ph") == phase) out.push_back(e);
    }
    return out;
  }

  std::string path_;
};

// ---------------------------------------------------------------------------------------------
// The file

TEST_F(TraceFile, ConstructionWritesAValidEmptyTrace) {
  trace_recorder r(path_);
  ASSERT_TRUE(std::filesystem::exists(path_));
  const json trace = read();
  EXPECT_EQ(trace.at("displayTimeUnit"), "ns");
  EXPECT_EQ(trace.at("otherData").at("dropped_events"), 0);
  EXPECT_EQ(trace.at("otherData").at("max_events"), 1 << 20);
  EXPECT_EQ(events_of(trace, "X").size(), 0u);
  const std::vector<json> meta = events_of(trace, "M");
  ASSERT_EQ(meta.size(), 1u);
  EXPECT_EQ(meta[0].at("name"), "process_name");
  EXPECT_EQ(meta[0].at("args").at("name"), "stepflow");
}

TEST_F(TraceFile, ConstructionTruncatesAnExistingFile) {
  {
    std::ofstream old(path_);
    old << std::string(100'000, 'x');
  }
  trace_recorder r(path_);
  EXPECT_LT(std::filesystem::file_size(path_), 1000u);
  EXPECT_NO_THROW(read());
}

// `f()` throws config_error naming `path` and `reason`.
template <class F>
void expect_file_error(F f, const std::string& path, const std::string& reason) {
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const config_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(path), std::string::npos) << what;
    EXPECT_NE(what.find(reason), std::string::npos) << what;
  }
}

TEST(TraceErrors, UnwritablePathThrowsConfigErrorNamingThePathAndTheReason) {
  const std::string path = "/nonexistent-dir/x.json";
  expect_file_error([&] { trace_recorder r(path); }, path, "No such file or directory");
}

TEST(TraceErrors, AFailingWriteThrowsConfigError) {
  if (!std::filesystem::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  // /dev/full opens fine and fails every write with ENOSPC. A device gets its one document from
  // write_final().
  trace_recorder r("/dev/full");
  EXPECT_NO_THROW(r.write());
  expect_file_error([&] { r.write_final(); }, "/dev/full", "No space left on device");
}

TEST(TraceErrors, ADirectoryIsRefusedAsATraceFile) {
  const std::string dir = std::filesystem::temp_directory_path().string();
  expect_file_error([&] { trace_recorder r(dir); }, dir, "Is a directory");
}

TEST_F(TraceFile, TwoRecordersOfOneFileWriteItAndANumberedSiblingAndKeepTheirOwnEvents) {
  const std::filesystem::path p(path_);
  const std::string stem = (p.parent_path() / p.stem()).string();
  const std::string second = stem + ".2.json";
  const std::string third = stem + ".3.json";
  {
    trace_recorder a(path_);
    trace_recorder b(path_);
    // Another spelling of the same file is the same file.
    trace_recorder c((p.parent_path() / "." / p.filename()).string());
    EXPECT_EQ(a.path(), path_);
    EXPECT_EQ(b.path(), second);
    EXPECT_EQ(c.path(), third);
    a.complete(a.track("a"), closure_kind::sync, "from a", 1, trace_recorder::now_ns(), 1);
    b.complete(b.track("b"), closure_kind::sync, "from b", 1, trace_recorder::now_ns(), 1);
    a.write();
    b.write();
    c.write();
    EXPECT_EQ(events_of(read(), "X").at(0).at("name"), "from a");
    std::ifstream in(second);
    const json from_b = json::parse(in);
    EXPECT_EQ(events_of(from_b, "X").at(0).at("name"), "from b");
    EXPECT_TRUE(std::filesystem::exists(third));
    {
      trace_recorder d(path_);
      EXPECT_EQ(d.path(), stem + ".4.json");
      std::filesystem::remove(d.path());
    }
  }
  // Released with their recorders.
  {
    trace_recorder again(path_);
    EXPECT_EQ(again.path(), path_);
  }
  std::filesystem::remove(second);
  std::filesystem::remove(third);
}

TEST_F(TraceFile, AWriteWithNothingNewLeavesTheFileAlone) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  r.complete(t, closure_kind::sync, "x", 1, trace_recorder::now_ns(), 1);
  r.write();
  struct stat before {};
  ASSERT_EQ(::stat(path_.c_str(), &before), 0);
  r.write();
  r.write_final();
  struct stat after {};
  ASSERT_EQ(::stat(path_.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);  // each version is a new file renamed over the trace
  r.complete(t, closure_kind::sync, "y", 2, trace_recorder::now_ns(), 1);
  r.write();
  ASSERT_EQ(::stat(path_.c_str(), &after), 0);
  EXPECT_NE(before.st_ino, after.st_ino);
  EXPECT_EQ(events_of(read(), "X").size(), 2u);
}

TEST_F(TraceFile, NoTemporaryFileIsLeftNextToTheTrace) {
  {
    trace_recorder r(path_);
    r.complete(r.track("d"), closure_kind::sync, "x", 1, trace_recorder::now_ns(), 1);
    r.write();
  }
  const std::string name = std::filesystem::path(path_).filename().string();
  for (const auto& entry :
       std::filesystem::directory_iterator(std::filesystem::path(path_).parent_path())) {
    const std::string other = entry.path().filename().string();
    EXPECT_FALSE(other.starts_with("." + name)) << other;
  }
}

// A pipe (as with STEPFLOW_TRACE=/dev/stdout piped into a viewer) cannot be rewritten: it gets
// one document, from write_final(), however often the trace was written before.
TEST_F(TraceFile, APipeGetsOneDocumentFromTheFinalWrite) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  {
    trace_recorder r("/proc/self/fd/" + std::to_string(fds[1]));
    const std::uint32_t t = r.track("d");
    for (std::uint64_t step = 1; step <= 3; ++step) {
      r.complete(t, closure_kind::async, "x", step, trace_recorder::now_ns(), 1);
      r.write();
    }
    r.write_final();
    r.write_final();
  }
  ::close(fds[1]);
  std::string text;
  char buffer[4096];
  for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;) {
    text.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  const json trace = json::parse(text);  // throws unless exactly one document
  EXPECT_EQ(events_of(trace, "X").size(), 3u);
}

// STEPFLOW_TRACE=/dev/stdout with stdout redirected to a log file: the trace is appended to the
// log, which is neither replaced (that would detach it from the descriptor) nor overwritten.
TEST_F(TraceFile, StdoutRedirectedToAFileGetsTheTraceAfterWhatIsThere) {
  const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  const std::string log = "a log line\n";
  ASSERT_EQ(::write(fd, log.data(), log.size()), static_cast<ssize_t>(log.size()));
  struct stat before {};
  ASSERT_EQ(::fstat(fd, &before), 0);
  {
    trace_recorder r("/dev/fd/" + std::to_string(fd));
    r.complete(r.track("d"), closure_kind::sync, "x", 1, trace_recorder::now_ns(), 1);
    r.write();
    r.write_final();
  }
  ::close(fd);
  struct stat after {};
  ASSERT_EQ(::stat(path_.c_str(), &after), 0);
  EXPECT_EQ(before.st_ino, after.st_ino);
  std::ifstream in(path_);
  std::stringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  ASSERT_TRUE(all.starts_with(log)) << all.substr(0, 100);
  EXPECT_EQ(events_of(json::parse(all.substr(log.size())), "X").size(), 1u);
}

// Each version goes to a temporary file renamed over the trace, so a reader (a viewer opening the
// trace while training runs) sees a whole version, never a mix or a prefix.
TEST_F(TraceFile, AReaderDuringWritesAlwaysSeesAWholeTrace) {
  trace_recorder r(path_, 20'000);
  std::atomic<bool> writing{true};
  std::atomic<int> reads{0};
  std::thread reader([&] {
    while (writing.load()) {
      std::ifstream in(path_);
      std::stringstream text;
      text << in.rdbuf();
      EXPECT_TRUE(json::accept(text.str())) << "read " << reads.load();
      reads.fetch_add(1);
    }
  });
  // Versions of up to 3.5 MB (1 MB goes to the file at a time), each with one more track: its
  // metadata comes first, so the rest of the file moves, and the start of one version followed
  // by the end of the one before is not valid JSON.
  for (int version = 1; version <= 15; ++version) {
    const std::uint32_t t = r.track("d" + std::to_string(version));
    for (int i = 0; i < 2000; ++i) {
      r.complete(t, closure_kind::sync, "a label long enough to make the events big", 1,
                 trace_recorder::now_ns(), 1);
    }
    r.write();
    while (reads.load() < version) std::this_thread::yield();
  }
  writing = false;
  reader.join();
}

TEST_F(TraceFile, WriteTwiceGivesValidJsonBothTimes) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  for (std::uint64_t i = 0; i < 50; ++i) {
    r.complete(t, closure_kind::sync, "first", i, trace_recorder::now_ns(), 10);
  }
  r.write();
  EXPECT_EQ(events_of(read(), "X").size(), 50u);
  for (std::uint64_t i = 0; i < 3; ++i) {
    r.complete(t, closure_kind::async, "second", i, trace_recorder::now_ns(), 10);
  }
  r.write();
  // The second write replaces the first (shorter or longer), never appends to it.
  EXPECT_EQ(events_of(read(), "X").size(), 53u);
  r.write();
  EXPECT_EQ(events_of(read(), "X").size(), 53u);
}

// ---------------------------------------------------------------------------------------------
// Events and tracks

TEST_F(TraceFile, CompleteEventsCarryNameKindStepTimeAndTrack) {
  const std::uint64_t before = trace_recorder::now_ns();
  trace_recorder r(path_);
  const std::uint64_t after = trace_recorder::now_ns();
  const std::uint32_t gpu = r.track("gpu:0");
  const std::uint32_t cpu = r.track("cpu");
  EXPECT_NE(gpu, cpu);
  EXPECT_EQ(r.track("gpu:0"), gpu);  // stable

  const std::uint64_t start = trace_recorder::now_ns();
  r.complete(gpu, closure_kind::sync, "log_loss", 7, start, 1'500);
  r.complete(cpu, closure_kind::async, nullptr, 8, start + 2'000'123, 42);
  r.complete(cpu, closure_kind::joined, "", 9, start, 0);
  r.write();

  const json trace = read();
  const std::vector<json> x = events_of(trace, "X");
  ASSERT_EQ(x.size(), 3u);

  EXPECT_EQ(x[0].at("name"), "log_loss");
  EXPECT_EQ(x[0].at("cat"), "sync");
  EXPECT_EQ(x[0].at("pid"), 1);
  EXPECT_EQ(x[0].at("tid"), gpu);
  EXPECT_EQ(x[0].at("args").at("step"), 7);
  EXPECT_EQ(x[0].at("args").at("kind"), "sync");
  EXPECT_DOUBLE_EQ(x[0].at("dur").get<double>(), 1.5);  // microseconds
  // ts: microseconds since the recorder was created.
  const double ts = x[0].at("ts").get<double>();
  EXPECT_GE(ts * 1000, static_cast<double>(start - after) - 1);
  EXPECT_LE(ts * 1000, static_cast<double>(start - before) + 1);

  EXPECT_EQ(x[1].at("name"), "async");  // no label: the kind names it
  EXPECT_EQ(x[1].at("cat"), "async");
  EXPECT_EQ(x[1].at("tid"), cpu);
  EXPECT_EQ(x[1].at("args").at("step"), 8);
  EXPECT_NEAR(x[1].at("ts").get<double>() - ts, 2000.123, 1e-6);
  EXPECT_DOUBLE_EQ(x[1].at("dur").get<double>(), 0.042);

  EXPECT_EQ(x[2].at("name"), "joined");
  EXPECT_EQ(x[2].at("args").at("kind"), "joined");
  EXPECT_EQ(x[2].at("dur"), 0);

  // One named track per device.
  std::map<int, std::string> names;
  std::map<int, int> sort_index;
  for (const json& m : events_of(trace, "M")) {
    if (m.at("name") == "thread_name") names[m.at("tid")] = m.at("args").at("name");
    if (m.at("name") == "thread_sort_index")
      sort_index[m.at("tid")] = m.at("args").at("sort_index");
  }
  EXPECT_EQ(names.size(), 2u);
  EXPECT_EQ(names[static_cast<int>(gpu)], "device gpu:0");
  EXPECT_EQ(names[static_cast<int>(cpu)], "device cpu");
  EXPECT_EQ(sort_index.size(), 2u);
}

TEST_F(TraceFile, CounterEventsCarryNameValueAndTime) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  r.counter(t, "queue depth d", 5, trace_recorder::now_ns());
  r.counter(t, "queue depth d", 0, trace_recorder::now_ns());
  r.counter(t, "queue depth e", 9, trace_recorder::now_ns());
  r.write();
  const std::vector<json> c = events_of(read(), "C");
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].at("name"), "queue depth d");
  EXPECT_EQ(c[0].at("args").at("value"), 5);
  EXPECT_EQ(c[1].at("args").at("value"), 0);
  EXPECT_EQ(c[2].at("name"), "queue depth e");
  EXPECT_EQ(c[2].at("args").at("value"), 9);
  EXPECT_EQ(c[0].at("pid"), 1);
  EXPECT_TRUE(c[0].at("ts").is_number());
  EXPECT_LE(c[0].at("ts").get<double>(), c[1].at("ts").get<double>());
}

TEST_F(TraceFile, LabelsAndDeviceNamesAreEscaped) {
  trace_recorder r(path_);
  const std::string device = "dev \"q\" \\ \x01 \xff end";  // \xff is not UTF-8
  const std::uint32_t t = r.track(device);
  const std::string label = "a\"b\\c\nd\te\x1f ü";
  r.complete(t, closure_kind::sync, label.c_str(), 1, trace_recorder::now_ns(), 1);
  r.counter(t, "depth \"x\"", 1, trace_recorder::now_ns());
  r.write();
  const json trace = read();
  const std::vector<json> x = events_of(trace, "X");
  ASSERT_EQ(x.size(), 1u);
  EXPECT_EQ(x[0].at("name"), label);
  EXPECT_EQ(events_of(trace, "C").at(0).at("name"), "depth \"x\"");
  bool found = false;
  for (const json& m : events_of(trace, "M")) {
    if (m.at("name") == "thread_name") {
      // The invalid byte becomes U+FFFD; everything else comes back as it was.
      EXPECT_EQ(m.at("args").at("name"), "device dev \"q\" \\ \x01 \xEF\xBF\xBD end");
      found = true;
    }
  }
  EXPECT_TRUE(found);
}

TEST_F(TraceFile, LongLabelsAreCutAtACharacterBoundary) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  const std::string exact(trace_recorder::max_label_bytes, 'x');
  const std::string longer(40, 'y');
  // 31 ASCII bytes, then a 2-byte character that would straddle the 32-byte limit.
  const std::string straddling = std::string(31, 'z') + "\xC3\xA9" + "tail";
  r.complete(t, closure_kind::sync, exact.c_str(), 1, trace_recorder::now_ns(), 1);
  r.complete(t, closure_kind::sync, longer.c_str(), 2, trace_recorder::now_ns(), 1);
  r.complete(t, closure_kind::sync, straddling.c_str(), 3, trace_recorder::now_ns(), 1);
  r.write();
  const std::vector<json> x = events_of(read(), "X");
  ASSERT_EQ(x.size(), 3u);
  EXPECT_EQ(x[0].at("name"), exact);
  EXPECT_EQ(x[1].at("name"), std::string(32, 'y') + "\xE2\x80\xA6");
  EXPECT_EQ(x[2].at("name"), std::string(31, 'z') + "\xE2\x80\xA6");
}

TEST_F(TraceFile, LabelIsCopiedSoItNeedNotOutliveTheCall) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  {
    std::string temporary = "temporary label";
    r.complete(t, closure_kind::async, temporary.c_str(), 1, trace_recorder::now_ns(), 1);
    temporary.assign("overwritten!!!!");
  }
  r.write();
  EXPECT_EQ(events_of(read(), "X").at(0).at("name"), "temporary label");
}

// ---------------------------------------------------------------------------------------------
// Bounded memory

TEST_F(TraceFile, AFullRingKeepsTheMostRecentEventsAndCountsTheDropped) {
  trace_recorder r(path_, 100);
  const std::uint32_t t = r.track("d");
  for (std::uint64_t i = 0; i < 250; ++i) {
    r.complete(t, closure_kind::sync, nullptr, i, trace_recorder::now_ns(), 1);
  }
  EXPECT_EQ(r.dropped(), 150u);
  r.write();
  const json trace = read();
  const std::vector<json> x = events_of(trace, "X");
  ASSERT_EQ(x.size(), 100u);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x[i].at("args").at("step"), 150 + i);
  EXPECT_EQ(trace.at("otherData").at("dropped_events"), 150);
  EXPECT_EQ(trace.at("otherData").at("max_events"), 100);
}

TEST_F(TraceFile, ARingSpanningSeveralChunksWrapsCorrectly) {
  constexpr std::uint64_t capacity = 3000;  // chunks of 1024: the last one is partial
  trace_recorder r(path_, capacity);
  const std::uint32_t t = r.track("d");
  for (std::uint64_t i = 0; i < 2 * capacity + 17; ++i) {
    r.complete(t, closure_kind::async, nullptr, i, i, 1);
  }
  EXPECT_EQ(r.dropped(), capacity + 17);
  r.write();
  const std::vector<json> x = events_of(read(), "X");
  ASSERT_EQ(x.size(), capacity);
  for (std::size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(x[i].at("args").at("step"), capacity + 17 + i);
  }
}

TEST_F(TraceFile, ZeroCapacityKeepsNothingAndCountsEverything) {
  trace_recorder r(path_, 0);
  const std::uint32_t t = r.track("d");
  r.complete(t, closure_kind::sync, "x", 1, trace_recorder::now_ns(), 1);
  r.counter(t, "c", 1, trace_recorder::now_ns());
  EXPECT_EQ(r.dropped(), 2u);
  r.write();
  const json trace = read();
  EXPECT_EQ(events_of(trace, "X").size(), 0u);
  EXPECT_EQ(trace.at("otherData").at("dropped_events"), 2);
}

TEST_F(TraceFile, CounterNamesBeyondTheLimitAreDropped) {
  trace_recorder r(path_);
  const std::uint32_t t = r.track("d");
  for (std::size_t i = 0; i < trace_recorder::max_counter_names + 10; ++i) {
    r.counter(t, "c" + std::to_string(i), i, trace_recorder::now_ns());
  }
  r.counter(t, "c0", 1, trace_recorder::now_ns());  // a known name still records
  EXPECT_EQ(r.dropped(), 10u);
  r.write();
  EXPECT_EQ(events_of(read(), "C").size(), trace_recorder::max_counter_names + 1);
}

// ---------------------------------------------------------------------------------------------
// Threads

TEST_F(TraceFile, EventsFromSeveralThreadsAreAllRecorded) {
  constexpr int threads = 4;
  constexpr std::uint64_t per_thread = 2000;
  trace_recorder r(path_);
  std::vector<std::thread> pool;
  std::vector<std::uint32_t> tracks(threads);
  for (int i = 0; i < threads; ++i) {
    pool.emplace_back([&r, &tracks, i] {
      const std::string device = "dev" + std::to_string(i);
      const std::uint32_t t = r.track(device);  // concurrent track() calls
      tracks[static_cast<std::size_t>(i)] = t;
      const std::string label = "work " + std::to_string(i);
      const std::string counter = "queue depth " + device;
      for (std::uint64_t step = 0; step < per_thread; ++step) {
        const std::uint64_t start = trace_recorder::now_ns();
        r.complete(t, i % 2 == 0 ? closure_kind::sync : closure_kind::async, label.c_str(), step,
                   start, 100 + step);
        if (step % 10 == 0) r.counter(t, counter, step, start);
      }
    });
  }
  for (std::thread& th : pool) th.join();
  EXPECT_EQ(r.dropped(), 0u);
  r.write();

  const json trace = read();
  const std::vector<json> x = events_of(trace, "X");
  ASSERT_EQ(x.size(), threads * per_thread);
  EXPECT_EQ(events_of(trace, "C").size(), threads * per_thread / 10);
  EXPECT_EQ(std::set<std::uint32_t>(tracks.begin(), tracks.end()).size(),
            static_cast<std::size_t>(threads));

  // Per track: the right label, kind and every step exactly once, in recording order.
  std::map<std::uint32_t, std::vector<std::uint64_t>> steps;
  for (const json& e : x) {
    const auto tid = e.at("tid").get<std::uint32_t>();
    const auto i =
        static_cast<std::size_t>(std::find(tracks.begin(), tracks.end(), tid) - tracks.begin());
    ASSERT_LT(i, tracks.size());
    EXPECT_EQ(e.at("name"), "work " + std::to_string(i));
    EXPECT_EQ(e.at("cat"), i % 2 == 0 ? "sync" : "async");
    const auto step = e.at("args").at("step").get<std::uint64_t>();
    EXPECT_NEAR(e.at("dur").get<double>(), static_cast<double>(100 + step) / 1000, 1e-9);
    steps[tid].push_back(step);
  }
  for (const auto& [tid, s] : steps) {
    ASSERT_EQ(s.size(), per_thread) << tid;
    for (std::uint64_t k = 0; k < per_thread; ++k) EXPECT_EQ(s[k], k) << tid;
  }
  std::size_t named = 0;
  for (const json& m : events_of(trace, "M")) named += m.at("name") == "thread_name" ? 1 : 0;
  EXPECT_EQ(named, static_cast<std::size_t>(threads));
}

// Recording goes on while write() copies the ring out; with a small ring, the recorders overwrite
// events the writer has not copied yet (often the whole window it set out to write).
class TraceWhileRecording : public TraceFile, public testing::WithParamInterface<std::size_t> {};

TEST_P(TraceWhileRecording, EveryWriteIsValidJsonWithinTheBoundAndInOrder) {
  const std::size_t capacity = GetParam();
  trace_recorder r(path_, capacity);
  std::atomic<bool> stop{false};
  std::vector<std::thread> pool;
  for (int i = 0; i < 2; ++i) {
    pool.emplace_back([&r, &stop, i] {
      const std::uint32_t t = r.track("dev" + std::to_string(i));
      for (std::uint64_t step = 0; !stop.load(std::memory_order_relaxed); ++step) {
        r.complete(t, closure_kind::async, "busy", step, trace_recorder::now_ns(), 5);
        if (step % 100 == 0) r.counter(t, "depth", step, trace_recorder::now_ns());
      }
    });
  }
  for (int w = 0; w < 20; ++w) {
    r.write();
    const json trace = read();  // throws on invalid JSON
    const std::vector<json> x = events_of(trace, "X");
    ASSERT_LE(x.size() + events_of(trace, "C").size(), capacity) << "write " << w;
    // Each recorder's events come out once each, in the order it recorded them.
    std::map<std::uint32_t, std::uint64_t> next_step;
    for (const json& e : x) {
      const auto tid = e.at("tid").get<std::uint32_t>();
      const auto step = e.at("args").at("step").get<std::uint64_t>();
      if (const auto it = next_step.find(tid); it != next_step.end()) {
        ASSERT_GE(step, it->second) << "write " << w;
      }
      next_step[tid] = step + 1;
    }
  }
  stop = true;
  for (std::thread& th : pool) th.join();
  r.write();
  const json trace = read();
  const std::uint64_t dropped = r.dropped();
  const std::size_t kept = events_of(trace, "X").size() + events_of(trace, "C").size();
  EXPECT_EQ(trace.at("otherData").at("dropped_events").get<std::uint64_t>(), dropped);
  if (dropped > 0) {
    EXPECT_EQ(kept, capacity);
  }
}

INSTANTIATE_TEST_SUITE_P(RingSizes, TraceWhileRecording, testing::Values(64, 5000));

}  // namespace
}  // namespace stepflow
