// Every test here runs real device hosts and VMs as processes on a 2-core machine: one at a time, so that timing-
// sensitive steps (a verify pass, a migration's phases) are not starved by the neighbouring test's VMs.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
