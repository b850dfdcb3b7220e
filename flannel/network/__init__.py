"""Per-network loop (acquire, renew, watch, re-acquire), single and multi network, subnet.env."""
