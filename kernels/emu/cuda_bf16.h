// cuda_bf16.h for the host emulation (moelab-kernels feature `cuda-emu`): see moelab_emu.h.
#pragma once
#include "moelab_emu.h"
