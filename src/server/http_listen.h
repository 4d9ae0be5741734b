// Binding an httplib::Server to its port with the listen backlog a server needs.
//
// Debian ships cpp-httplib as a compiled library built with a listen backlog of 5; defining
// CPPHTTPLIB_LISTEN_BACKLOG in our code changes nothing, since listen() runs inside the library.
// With 5, a burst of connections (a dozen clients at once on a busy machine) overflows the accept
// queue, the kernel drops the handshakes behind it and those clients resend them a second later:
// a 429 or a /health answer then takes a second instead of a millisecond. BindHttp binds through
// httplib, then listens again on the same socket with the backlog asked for (Linux resizes the
// queue of a listening socket). It binds with SO_REUSEADDR rather than httplib's SO_REUSEPORT, so
// that a second server on a port in use fails instead of silently sharing the port, and sets
// TCP_NODELAY (httplib's default is off), which every accepted connection inherits: a token
// stream is a run of small writes, and with Nagle's algorithm each would wait for the ACK of the
// one before, which a client may delay (40 ms on Linux, 200 ms on Windows).
#pragma once

#include <string>

#include "cachette/status.h"

namespace httplib {
class Server;
}

namespace cachette::server {

// The kernel caps the backlog at net.core.somaxconn (4096 by default).
inline constexpr int kListenBacklog = 1024;

// Binds `http` to host:port (port 0: a free port) and sets the listen backlog; returns the port.
// Call once, before listen_after_bind().
Result<int> BindHttp(httplib::Server& http, const std::string& host, int port,
                     int backlog = kListenBacklog);

}  // namespace cachette::server
