// matrix-js-sdk 43 uses Promise.withResolvers, which Node only has from 22 on; Debian's Node is 20.
// This module is imported before the SDK so the SDK's module evaluation already sees it.
if (typeof Promise.withResolvers !== "function") {
    Promise.withResolvers = function withResolvers() {
        let resolve;
        let reject;
        const promise = new this((res, rej) => {
            resolve = res;
            reject = rej;
        });
        return { promise, resolve, reject };
    };
}
