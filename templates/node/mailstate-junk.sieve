# mailstate / pi-pull (docs/inbound.md): before each mailbox's own filters, a message rspamd marked
# as spam (X-Spam: Yes, over the junk score of the mailbox's policy) goes into Junk.
require ["fileinto", "mailbox"];
if header :is "X-Spam" "Yes" {
  fileinto :create "Junk";
  stop;
}
