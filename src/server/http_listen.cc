#include "server/http_listen.h"

#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>

namespace cachette::server {

Result<int> BindHttp(httplib::Server& http, const std::string& host, int port, int backlog) {
  const std::string where = host + ":" + std::to_string(port);
  // httplib calls the options once for each address it tries; the last call is the bound socket.
  auto fd = std::make_shared<int>(-1);
  http.set_socket_options([fd](int sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);  // accepted sockets inherit it
    *fd = sock;
  });
  int bound = -1;
  try {
    if (port == 0) {
      bound = http.bind_to_any_port(host);
    } else if (http.bind_to_port(host, port)) {
      bound = port;
    }
  } catch (const std::exception& e) {
    return Unavailable("cannot listen on " + where + ": " + e.what());
  }
  if (bound <= 0 || *fd < 0) {
    return Unavailable("cannot listen on " + where + " (address in use or not local?)");
  }
  if (::listen(*fd, backlog) != 0) {
    return Unavailable("cannot set the listen backlog of " + where + " to " +
                       std::to_string(backlog) + ": " + std::strerror(errno));
  }
  return bound;
}

}  // namespace cachette::server
