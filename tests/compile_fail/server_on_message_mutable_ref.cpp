// expect-error: Server::on_message must be callable as on_message(const message_type&)
// on_message(std::string&) cannot bind the const message the worker decodes, so it used to be
// ignored: the Server compiled and never heard from the master.
#include <prefork/cluster.hpp>

#include <string>

struct Bad {
  void on_connection(prefork::Connection) {}
  void on_message(std::string& m);
};

int main() {
  prefork::Cluster<Bad> cluster;
  return cluster.run();
}
