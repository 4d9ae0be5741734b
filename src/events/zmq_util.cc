#include "events/zmq_util.h"

#include <zmq.h>

#include <cerrno>

namespace cachette::events::internal {

void ZmqContextDeleter::operator()(void* context) const {
  // zmq_ctx_term is interrupted by signals (EINTR); it must be called again until it returns.
  while (zmq_ctx_term(context) != 0 && zmq_errno() == EINTR) {
  }
}

void ZmqSocketDeleter::operator()(void* socket) const { zmq_close(socket); }

std::string ZmqError() { return zmq_strerror(zmq_errno()); }

Result<ZmqContext> NewZmqContext() {
  void* context = zmq_ctx_new();
  if (context == nullptr)
    return IOError("kv events: cannot create a ZeroMQ context: " + ZmqError());
  return ZmqContext(context);
}

Result<ZmqSocket> NewZmqSocket(void* context, int type) {
  ZmqSocket socket(zmq_socket(context, type));
  if (socket == nullptr) return IOError("kv events: cannot create a ZeroMQ socket: " + ZmqError());
  CT_RETURN_IF_ERROR(SetZmqOption(socket.get(), ZMQ_LINGER, 0, "ZMQ_LINGER"));
  return socket;
}

Status SetZmqOption(void* socket, int option, int value, std::string_view name) {
  if (zmq_setsockopt(socket, option, &value, sizeof(value)) != 0) {
    return InvalidArgument("kv events: cannot set " + std::string(name) + " to " +
                           std::to_string(value) + ": " + ZmqError());
  }
  return Status::Ok();
}

Status SetZmqOption64(void* socket, int option, int64_t value, std::string_view name) {
  if (zmq_setsockopt(socket, option, &value, sizeof(value)) != 0) {
    return InvalidArgument("kv events: cannot set " + std::string(name) + " to " +
                           std::to_string(value) + ": " + ZmqError());
  }
  return Status::Ok();
}

namespace {

// An endpoint libzmq could not parse or does not support is the caller's mistake; anything
// else (the address is taken, not local, not permitted) is the environment's.
bool IsEndpointSyntaxError(int error) {
  return error == EINVAL || error == EPROTONOSUPPORT || error == ENOCOMPATPROTO;
}

}  // namespace

Result<std::string> BindZmq(void* socket, const std::string& endpoint) {
  if (zmq_bind(socket, endpoint.c_str()) != 0) {
    const int error = zmq_errno();
    std::string message = "kv events: cannot bind " + endpoint + ": " + zmq_strerror(error);
    if (IsEndpointSyntaxError(error)) return InvalidArgument(std::move(message));
    return Unavailable(std::move(message));
  }
  char bound[1024];
  size_t size = sizeof(bound);
  if (zmq_getsockopt(socket, ZMQ_LAST_ENDPOINT, bound, &size) != 0 || size == 0) return endpoint;
  return std::string(bound, size - 1);  // size counts the terminating NUL
}

Status ConnectZmq(void* socket, const std::string& endpoint) {
  if (zmq_connect(socket, endpoint.c_str()) != 0) {
    return InvalidArgument("kv events: cannot connect to " + endpoint + ": " + ZmqError());
  }
  return Status::Ok();
}

bool ReceiveZmq(void* socket, size_t max_frames, ZmqMessage* message) {
  message->frames.clear();
  message->frame_count = 0;
  int flags = ZMQ_DONTWAIT;  // only the first frame may be missing: the rest arrive with it
  while (true) {
    zmq_msg_t frame;
    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, socket, flags) < 0) {
      zmq_msg_close(&frame);
      // Nothing waiting (or, after the first frame, a failure libzmq does not document).
      return message->frame_count > 0;
    }
    if (message->frames.size() < max_frames) {
      message->frames.emplace_back(static_cast<const char*>(zmq_msg_data(&frame)),
                                   zmq_msg_size(&frame));
    }
    ++message->frame_count;
    const bool more = zmq_msg_more(&frame) != 0;
    zmq_msg_close(&frame);
    if (!more) return true;
    flags = 0;
  }
}

bool SendZmq(void* socket, std::initializer_list<std::string_view> frames) {
  size_t i = 0;
  for (std::string_view frame : frames) {
    const bool last = ++i == frames.size();
    const int flags = ZMQ_DONTWAIT | (last ? 0 : ZMQ_SNDMORE);
    // libzmq queues a multipart message as a whole: only the first frame can meet a full queue.
    if (zmq_send(socket, frame.data(), frame.size(), flags) < 0) return false;
  }
  return true;
}

}  // namespace cachette::events::internal
