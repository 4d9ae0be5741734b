// Thin RAII and message helpers over libzmq's C API, for the publisher and the subscriber.
//
// Ownership: a ZmqContext owns a context (zmq_ctx_term on destruction, which waits until every
// socket of the context is closed), a ZmqSocket owns a socket (zmq_close). Declare the context
// before its sockets so the sockets close first. Sockets are not thread-safe: each belongs to
// one thread at a time (handing one over needs a happens-before, such as starting the thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"

namespace cachette::events::internal {

struct ZmqContextDeleter {
  void operator()(void* context) const;
};
struct ZmqSocketDeleter {
  void operator()(void* socket) const;
};
using ZmqContext = std::unique_ptr<void, ZmqContextDeleter>;
using ZmqSocket = std::unique_ptr<void, ZmqSocketDeleter>;

// zmq_strerror of the calling thread's last libzmq error.
std::string ZmqError();

// A context with one I/O thread. kIOError when libzmq cannot make one.
Result<ZmqContext> NewZmqContext();

// A socket of `type` (ZMQ_PUB, ...) with ZMQ_LINGER 0: closing it drops what is unsent, so
// closing never waits on a peer that is gone.
Result<ZmqSocket> NewZmqSocket(void* context, int type);

// Sets an int option; kInvalidArgument naming `name` when libzmq refuses it.
Status SetZmqOption(void* socket, int option, int value, std::string_view name);
// The same for the options libzmq takes as int64 (ZMQ_MAXMSGSIZE).
Status SetZmqOption64(void* socket, int option, int64_t value, std::string_view name);

// Binds `endpoint` and returns the endpoint actually bound (ZMQ_LAST_ENDPOINT: the port a
// "tcp://...:0" got). Errors name the endpoint: "kv events: cannot bind tcp://...: Address
// already in use" (kUnavailable), or kInvalidArgument for an endpoint libzmq cannot parse.
Result<std::string> BindZmq(void* socket, const std::string& endpoint);

// Connects to `endpoint` (libzmq retries in the background until a peer is there). Errors:
// kInvalidArgument naming an endpoint libzmq cannot parse.
Status ConnectZmq(void* socket, const std::string& endpoint);

// One multipart message.
struct ZmqMessage {
  std::vector<std::string> frames;  // the first `max_frames` frames
  size_t frame_count = 0;           // every frame the message had
};

// Receives one whole message without waiting; false when none is waiting. Frames beyond
// `max_frames` are received and dropped (counted in frame_count), so a peer cannot make the
// caller hold an unbounded frame list.
bool ReceiveZmq(void* socket, size_t max_frames, ZmqMessage* message);

// Sends `frames` as one message without waiting; false when the socket would block (a full
// queue) or libzmq fails. PUB and ROUTER sockets drop instead of blocking, so for them false is
// rare; a DEALER with no room says false.
bool SendZmq(void* socket, std::initializer_list<std::string_view> frames);

}  // namespace cachette::events::internal
