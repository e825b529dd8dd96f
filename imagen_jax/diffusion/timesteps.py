"""Where samplers evaluate a discrete schedule: integer timesteps, as a fixed-length array of times.

DeepFloyd IF samples its 1000-step DDPM at a subset of timesteps, descending: diffusers' default "leading"
spacing (N steps: k * (1000 // N) for k = N-1 .. 0, so 990, 980, ..., 0 for N = 100), or one of IF's named
lists (NAMED_TIMESTEPS). Every sampler (ddpm, ddim, dpmpp_2m) then steps from one listed timestep to the next;
the last evaluation (timestep 0 in every list here) returns its x0 estimate, which is what diffusers' last step
gives too (alpha_bar_prev = 1 there makes the posterior mean x0 exactly).

The grid enters the compiled sampling loop as an array of GRID_SIZE = 1001 times t = k / 1000, padded past the
last evaluation with t = -1/1000 ("before the first step"), so that one executable serves every step count
and every list.
"""

from __future__ import annotations

import numpy as np

from imagen_jax.diffusion.schedule import NUM_TIMESTEPS, check_schedule, is_discrete

GRID_SIZE = NUM_TIMESTEPS + 1

# DeepFloyd IF's step lists, the data of diffusers' pipelines/deepfloyd_if/timesteps.py (`<name>_timesteps`,
# Apache-2.0), which takes them from deep-floyd/IF; each descends strictly from 999 to 0.
# fmt: off
NAMED_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "fast27": (
        999, 800, 799, 600, 599, 500, 400, 399, 377, 355, 333, 311, 288, 266, 244, 222, 200, 199, 177, 155, 133, 111,
        88, 66, 44, 22, 0
    ),
    "smart27": (
        999, 976, 952, 928, 905, 882, 858, 857, 810, 762, 715, 714, 572, 429, 428, 286, 285, 238, 190, 143, 142, 118,
        95, 71, 47, 24, 0
    ),
    "smart50": (
        999, 988, 977, 966, 955, 944, 933, 922, 911, 900, 899, 879, 859, 840, 820, 800, 799, 766, 733, 700, 699, 650,
        600, 599, 500, 499, 400, 399, 350, 300, 299, 266, 233, 200, 199, 179, 159, 140, 120, 100, 99, 88, 77, 66, 55,
        44, 33, 22, 11, 0
    ),
    "smart100": (
        999, 995, 992, 989, 985, 981, 978, 975, 971, 967, 964, 961, 957, 956, 951, 947, 942, 937, 933, 928, 923, 919,
        914, 913, 908, 903, 897, 892, 887, 881, 876, 871, 870, 864, 858, 852, 846, 840, 834, 828, 827, 820, 813, 806,
        799, 792, 785, 784, 777, 770, 763, 756, 749, 742, 741, 733, 724, 716, 707, 699, 698, 688, 677, 666, 656, 655,
        645, 634, 623, 613, 612, 598, 584, 570, 569, 555, 541, 527, 526, 505, 484, 483, 462, 440, 439, 396, 395, 352,
        351, 308, 307, 264, 263, 220, 219, 176, 132, 88, 44, 0
    ),
    "smart185": (
        999, 997, 995, 992, 990, 988, 986, 984, 981, 979, 977, 975, 972, 970, 968, 966, 964, 961, 959, 957, 956, 954,
        951, 949, 946, 944, 941, 939, 936, 934, 931, 929, 926, 924, 921, 919, 916, 914, 913, 910, 907, 905, 902, 899,
        896, 893, 891, 888, 885, 882, 879, 877, 874, 871, 870, 867, 864, 861, 858, 855, 852, 849, 846, 843, 840, 837,
        834, 831, 828, 827, 824, 821, 817, 814, 811, 808, 804, 801, 798, 795, 791, 788, 785, 784, 780, 777, 774, 770,
        766, 763, 760, 756, 752, 749, 746, 742, 741, 737, 733, 730, 726, 722, 718, 714, 710, 707, 703, 699, 698, 694,
        690, 685, 681, 677, 673, 669, 664, 660, 656, 655, 650, 646, 641, 636, 632, 627, 622, 618, 613, 612, 607, 602,
        596, 591, 586, 580, 575, 570, 569, 563, 557, 551, 545, 539, 533, 527, 526, 519, 512, 505, 498, 491, 484, 483,
        474, 466, 457, 449, 440, 439, 428, 418, 407, 396, 395, 381, 366, 352, 351, 330, 308, 307, 286, 264, 263, 242,
        220, 219, 176, 175, 132, 131, 88, 44, 0
    ),
    "super27": (
        999, 991, 982, 974, 966, 958, 950, 941, 933, 925, 916, 908, 900, 899, 874, 850, 825, 800, 799, 700, 600, 500,
        400, 300, 200, 100, 0
    ),
    "super40": (
        999, 992, 985, 978, 971, 964, 957, 949, 942, 935, 928, 921, 914, 907, 900, 899, 879, 859, 840, 820, 800, 799,
        766, 733, 700, 699, 650, 600, 599, 500, 499, 400, 399, 300, 299, 200, 199, 100, 99, 0
    ),
    "super100": (
        999, 996, 992, 989, 985, 982, 979, 975, 972, 968, 965, 961, 958, 955, 951, 948, 944, 941, 938, 934, 931, 927,
        924, 920, 917, 914, 910, 907, 903, 900, 899, 891, 884, 876, 869, 861, 853, 846, 838, 830, 823, 815, 808, 800,
        799, 788, 777, 766, 755, 744, 733, 722, 711, 700, 699, 688, 677, 666, 655, 644, 633, 622, 611, 600, 599, 585,
        571, 557, 542, 528, 514, 500, 499, 485, 471, 457, 442, 428, 414, 400, 399, 379, 359, 340, 320, 300, 299, 279,
        259, 240, 220, 200, 199, 166, 133, 100, 99, 66, 33, 0
    ),
}
# fmt: on


def check_steps(steps: int | str, schedule: str) -> None:
    """Raises ValueError unless `steps` is a step count >= 1 (at most 1000 for a discrete schedule) or, for a
    discrete schedule, one of NAMED_TIMESTEPS (call early, before tracing)."""
    check_schedule(schedule)
    if isinstance(steps, str):
        if not is_discrete(schedule):
            raise ValueError(f"named sampling steps ({steps!r}) need a discrete schedule, not {schedule!r}")
        if steps not in NAMED_TIMESTEPS:
            raise ValueError(f"unknown sampling steps {steps!r}; valid names: {', '.join(NAMED_TIMESTEPS)}")
        return
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise ValueError(f"sampling steps must be an int or a step-list name, got {steps!r}")
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    if is_discrete(schedule) and steps > NUM_TIMESTEPS:
        raise ValueError(f"sampling steps must be <= {NUM_TIMESTEPS} with a discrete schedule, got {steps}")


def discrete_timesteps(steps: int | str) -> np.ndarray:
    """The descending integer timesteps (int64) of `steps`: "leading" spacing for a count, or a named list."""
    check_steps(steps, "discrete_cosine")
    if isinstance(steps, str):
        return np.asarray(NAMED_TIMESTEPS[steps], np.int64)
    return (np.arange(int(steps), dtype=np.int64) * (NUM_TIMESTEPS // int(steps)))[::-1].copy()


def padded_time_grid(timesteps: np.ndarray) -> np.ndarray:
    """[GRID_SIZE] float32 times k / 1000 of descending `timesteps`, then -1/1000 (t < 0: alpha_bar = 1)."""
    timesteps = np.asarray(timesteps, np.int64)
    if not 1 <= timesteps.size <= NUM_TIMESTEPS:
        raise ValueError(f"a time grid holds 1..{NUM_TIMESTEPS} timesteps, got {timesteps.size}")
    grid = np.full((GRID_SIZE,), np.float32(-1.0) / np.float32(NUM_TIMESTEPS), np.float32)
    grid[: timesteps.size] = timesteps.astype(np.float32) / np.float32(NUM_TIMESTEPS)
    return grid


def resolve_steps(steps: int | str, schedule: str) -> tuple[int, np.ndarray | None]:
    """(number of model evaluations, padded time grid or None): the grid for a discrete schedule; continuous
    schedules compute their grid inside the loop (solvers.time_grid)."""
    check_steps(steps, schedule)
    if not is_discrete(schedule):
        return int(steps), None
    timesteps = discrete_timesteps(steps)
    return int(timesteps.size), padded_time_grid(timesteps)
