#pragma once  // see ../../aoti/common_shims_slim.h
#include <executorch/backends/aoti/common_shims_slim.h>
