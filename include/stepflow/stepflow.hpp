#pragma once
/// \file
/// The umbrella header: everything a stepflow user needs.

#include "stepflow/closure.hpp"
#include "stepflow/device_context.hpp"
#include "stepflow/errors.hpp"
#include "stepflow/metrics.hpp"
#include "stepflow/options.hpp"
#include "stepflow/scheduler.hpp"
#include "stepflow/step_closures.hpp"
#include "stepflow/version.hpp"
