/* The RWKV chat prompt format of the HTTP service (docs/serving.md): pure
 * functions over bytes, pinned down by tests/test_serve_text.c. The prompt
 * format is serving's; the streamed text is src/text/stream.h's. */
#ifndef RP_SERVE_CHAT_H
#define RP_SERVE_CHAT_H

#include <stddef.h>

/* ---- RWKV chat format (docs/rwkv7.md Sampling, docs/serving.md) */

typedef enum { RP_CHAT_SYSTEM, RP_CHAT_USER, RP_CHAT_ASSISTANT } rp_chat_role;

typedef struct {
    rp_chat_role role;
    const char *content;
    size_t len;
} rp_chat_message;

/* "system" (or "developer")/"user"/"assistant" -> role; -1 for anything else. */
int rp_chat_role_parse(const char *name);

/* The prompt for messages m[0..n): each message is "Role: content", messages
 * are separated by a blank line, and unless the last message is the
 * assistant's (then the model continues that reply) the prompt ends with
 * "\n\nAssistant:". Content: blank lines inside are collapsed to one newline
 * (a blank line separates turns); system and user content are trimmed;
 * assistant content keeps its bytes but one leading space is the one of the
 * format ("Assistant: " + content, where content arrives as the server
 * returned it). `lead` is put first: the bytes needed to reach a turn
 * boundary when the prompt continues a stored session state
 * (rp_chat_session_lead). Returns a malloc'ed NUL-terminated string, *len its
 * length, or NULL when out of memory. */
char *rp_chat_prompt(const rp_chat_message *m, int n, const char *lead, size_t *len);

/* What must come before a new turn when a session's state ends with `tail`
 * (its last bytes, tail_len <= 2 is enough): "" after a blank line or for an
 * empty state, "\n" after one newline, "\n\n" otherwise. */
const char *rp_chat_session_lead(const char *tail, size_t tail_len);

/* The text returned as message.content for a generated reply: one leading
 * space (the one after "Assistant:") removed. Returns the offset to skip. */
size_t rp_chat_reply_skip(const char *text, size_t len);

#endif
