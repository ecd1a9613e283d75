#pragma once
// The TSan annotations live in a public detail header so that the flow adapters (header-only)
// can use them too.
#include "stepflow/detail/tsan.hpp"
