// Stub: the CPU harness provides everything in cuda_shim.h.
#pragma once
#include "cuda_shim.h"
