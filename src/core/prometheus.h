// Reading the Prometheus text exposition format: what the bench client, the soak run and the
// router need of a server's /metrics.
#pragma once

#include <optional>
#include <string_view>

namespace cachette {

// The value of the first sample line of a Prometheus text exposition whose name and labels
// are exactly `series` (e.g. `cachette_kv_pages{state="used"}` or `cachette_pins`); nullopt
// when absent or unparsable.
std::optional<double> PrometheusValue(std::string_view text, std::string_view series);

}  // namespace cachette
