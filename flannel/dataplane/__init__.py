"""The only modules that touch the kernel: TUN, netlink (pyroute2), iptables, the C proxy."""
