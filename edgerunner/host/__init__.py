"""What this Linux box reports: CPUs and their features, memory and its limits (meminfo, cgroup v1
and v2, PSI). Everything is read under a `root` ("/" on a real machine), so tests hand in a fake
tree. The layer below everything else: it imports nothing from edgerunner but errors."""
