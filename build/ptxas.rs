//! Reading ptxas's `-v` report (shared by build.rs and its test in tests/ptxas_report.rs).

/// The kernels (with their architecture) whose ptxas report shows spill stores or loads.
pub fn spilling_kernels(report: &str) -> Vec<String> {
    let mut current = String::new();
    let mut spills = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.replace('\'', "");
        }
        // `-warn-spills` repeats a kernel's counts in a warning printed before any kernel's report
        // (so before `current` names it): each kernel's own properties line is what counts.
        if line.starts_with("ptxas warning") {
            continue;
        }
        let spilled = ["bytes spill stores", "bytes spill loads"].iter().any(|key| {
            line.split(',').any(|part| {
                part.trim().ends_with(key)
                    && part.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0)
            })
        });
        if spilled {
            spills.push(current.clone());
        }
    }
    spills
}
