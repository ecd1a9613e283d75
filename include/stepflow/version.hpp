#pragma once
/// \file
/// stepflow's version.

#define STEPFLOW_VERSION_MAJOR 0
#define STEPFLOW_VERSION_MINOR 1
#define STEPFLOW_VERSION_PATCH 0

namespace stepflow {
inline constexpr const char* version_string = "0.1.0";
}
