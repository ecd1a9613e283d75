// A minimal stepflow user: a few steps of sync and async closures on one device.
#include <stepflow/stepflow.hpp>

#include <atomic>
#include <cstdio>

int main() {
  stepflow::options opts;
  opts.max_queue_size = 4;
  stepflow::scheduler s(opts);
  auto& dev = s.device("gpu0");
  int sync_runs = 0;
  std::atomic<int> async_runs{0};
  for (int step = 0; step < 3; ++step) {
    dev.add_step_closure([&] { ++sync_runs; });
    dev.add_step_closure(stepflow::run_async, [&] { ++async_runs; });
    dev.run_step_closures();
  }
  dev.flush();
  if (sync_runs != 3 || async_runs != 3 || dev.step() != 3) {
    std::puts("FAIL");
    return 1;
  }
  std::puts("consumer OK");
  return 0;
}
