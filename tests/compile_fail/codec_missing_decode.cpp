// expect-error: DecodesMessage
// A codec with message_type and encode() but no decode() is not a MessageCodec: a worker could
// send such messages but nobody could read them. The compiler must reject it where a
// MessageCodec is required, and its diagnostic must name the unsatisfied DecodesMessage.
#include <prefork/codec.hpp>

#include <string>

namespace {

struct EncodeOnly {
  using message_type = std::string;
  std::string encode(const message_type& m) const { return m; }
};

template <prefork::MessageCodec C>
struct Needs {};

}  // namespace

int main() {
  Needs<EncodeOnly> needs;
  (void)needs;
}
